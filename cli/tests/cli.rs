//! The real `shoal` binary against real nodes on 127.0.0.1 (mDNS off).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

fn shoal_bin() -> Result<PathBuf> {
    Ok(PathBuf::from(env!("CARGO_BIN_EXE_shoal")))
}

fn shoal(home: &Path, args: &[&str]) -> Result<Output> {
    Ok(Command::new(shoal_bin()?)
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("SHOAL_HOME")
        .output()?)
}

fn ok_json(home: &Path, args: &[&str]) -> Result<Value> {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let out = shoal(home, &a)?;
    if !out.status.success() {
        bail!(
            "shoal {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn err_text(home: &Path, args: &[&str]) -> Result<String> {
    let out = shoal(home, args)?;
    if out.status.success() {
        bail!("shoal {args:?} succeeded but should have failed");
    }
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A running `shoal up`, killed when dropped.
struct Up {
    child: Child,
    info: Value,
}

impl Up {
    fn start(home: &Path) -> Result<Self> {
        Self::start_with(home, &[])
    }

    fn start_with(home: &Path, extra: &[&str]) -> Result<Self> {
        let mut child = Command::new(shoal_bin()?)
            .arg("--home")
            .arg(home)
            .args([
                "--json",
                "up",
                "--no-mdns",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("no stdout")?;
        // The first stdout line (JSON) is the "node is up" event.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) if !l.is_empty() => l,
            _ => {
                let _ = child.kill();
                bail!("`shoal up` did not come up");
            }
        };
        Ok(Self {
            child,
            info: serde_json::from_str(&line).context("`shoal up --json` printed no JSON")?,
        })
    }

    fn kill9(mut self) -> Result<()> {
        self.child.kill()?; // SIGKILL
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn cli_end_to_end_init_up_space_doc_lock_kill9_restart() -> Result<()> {
    let t = tempfile::tempdir()?;
    let home = t.path().join("laptop");
    let h = home.as_path();

    // no node yet: a clear message that says how to start one
    let e = err_text(h, &["doc", "list", "notes"])?;
    assert!(
        e.contains("no shoal node is running") && e.contains("shoal up"),
        "{e}"
    );

    let init = ok_json(h, &["init", "--name", "laptop"])?;
    assert_eq!(init["name"], "laptop");
    let e = err_text(h, &["init"])?;
    assert!(e.contains("already initialised"), "{e}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(home.join("identity.key"))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let up = Up::start(h)?;
    assert_eq!(up.info["device_id"], init["device_id"]);
    // a second node on the same home is refused
    let e = err_text(h, &["up", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"])?;
    assert!(e.contains("already running"), "{e}");

    let id = ok_json(h, &["id"])?;
    assert_eq!(id["device_id"], init["device_id"]);
    assert!(id["listen_addrs"][0]
        .as_str()
        .unwrap_or("")
        .starts_with("/ip4/127.0.0.1/tcp/"));
    let s = ok_json(h, &["space", "create", "notes"])?;
    assert_eq!(s["role"], "owner");
    let e = err_text(h, &["space", "create", "notes"])?;
    assert!(e.contains("already exists"), "{e}");
    for i in 0..20 {
        ok_json(
            h,
            &[
                "doc",
                "put",
                "notes",
                "todo",
                &format!("/items/{i}"),
                &format!("\"item {i}\""),
            ],
        )?;
    }
    ok_json(h, &["doc", "put", "notes", "todo", "/done", "false"])?;
    ok_json(h, &["doc", "del", "notes", "todo", "/done"])?;
    let doc = ok_json(h, &["doc", "get", "notes", "todo"])?;
    assert_eq!(doc["items"].as_array().map(Vec::len), Some(20));
    assert_eq!(ok_json(h, &["doc", "list", "notes"])?, json!(["todo"]));
    // web apps: a document's automerge-repo URL, the space's endpoint
    let url = ok_json(h, &["doc", "url", "notes", "todo"])?;
    let url = url["url"].as_str().unwrap_or("");
    assert!(url.starts_with("automerge:"), "{url}");
    assert_eq!(
        ok_json(h, &["doc", "url", "notes", "todo"])?["url"],
        url,
        "stable"
    );
    let ws = ok_json(h, &["doc", "url", "notes"])?;
    let ws = ws["url"].as_str().unwrap_or("");
    assert!(
        ws.starts_with("ws://127.0.0.1:") && ws.contains("/repo?key="),
        "{ws}"
    );
    // the dashboard: `shoal up` printed a login link, and each
    // `shoal dashboard` a new one
    let first = up.info["dashboard"].as_str().unwrap_or("").to_string();
    let link = ok_json(h, &["dashboard"])?;
    let link = link["url"].as_str().unwrap_or("");
    for l in [first.as_str(), link] {
        assert!(
            l.starts_with("http://127.0.0.1:") && l.contains("/ui/login?code="),
            "{l}"
        );
    }
    assert_ne!(first, link);
    // the space is also addressable by id
    let by_id = ok_json(h, &["doc", "get", s["id"].as_str().unwrap_or(""), "todo"])?;
    assert_eq!(by_id, doc);
    // bad input: clear errors, nothing changes
    assert!(err_text(h, &["doc", "put", "notes", "todo", "/x", "not json"])?.contains("not JSON"));
    assert!(err_text(h, &["doc", "put", "notes", "todo", "x", "1"])?.contains("JSON pointer"));
    assert!(err_text(h, &["doc", "get", "nope", "todo"])?.contains("unknown space"));
    assert!(err_text(h, &["doc", "get", "notes", "nope"])?.contains("unknown document"));
    assert!(err_text(h, &["doc", "put", "notes", "members", "/x", "1"])?.contains("not allowed"));
    let members = ok_json(h, &["members", "notes"])?;
    assert_eq!(members[0]["role"], "owner");

    // kill -9: every acknowledged write survives
    up.kill9()?;
    let e = err_text(h, &["id"])?;
    assert!(e.contains("no shoal node is running"), "{e}");
    let _up = Up::start(h)?;
    assert_eq!(ok_json(h, &["doc", "get", "notes", "todo"])?, doc);
    Ok(())
}

#[test]
fn api_refuses_a_wrong_token() -> Result<()> {
    let t = tempfile::tempdir()?;
    let home = t.path().join("h");
    // no `init`: a fresh home initialises itself on the first `up`
    let _up = Up::start(&home)?;
    assert!(home.join("identity.key").exists() && home.join("api-token").exists());
    ok_json(&home, &["space", "list"])?;
    // an empty token file is refused by the client before any request
    std::fs::write(home.join("api-token"), "")?;
    let e = err_text(&home, &["space", "list"])?;
    assert!(e.contains("api-token") && e.contains("too short"), "{e}");
    std::fs::write(home.join("api-token"), "0".repeat(64))?;
    let e = err_text(&home, &["space", "list"])?;
    assert!(e.contains("token"), "{e}");
    Ok(())
}

/// A panic in a node task ends `shoal up` with a non-zero code and a clear
/// line naming the task, so a service manager restarts it (before, the
/// process stayed up with the task gone and answered 503 until restarted
/// by hand). `SHOAL_FAULT` is the CLI's test-only fault injection.
#[test]
fn a_panic_in_the_engine_ends_shoal_up_with_an_error() -> Result<()> {
    let t = tempfile::tempdir()?;
    let home = t.path().join("h");
    let child = Command::new(shoal_bin()?)
        .arg("--home")
        .arg(&home)
        .args(["up", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"])
        .env_remove("SHOAL_HOME")
        .env("SHOAL_FAULT", "engine-panic")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out?,
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            bail!("`shoal up` kept running after its engine panicked");
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "exited with {}: {stderr}",
        out.status
    );
    assert!(
        stderr.contains("error: the node failed: engine panicked: injected fault"),
        "{stderr}"
    );
    // the log line names the task and the panic
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("actor=engine") && l.contains("panic=")),
        "{stderr}"
    );
    // the home is released: the service manager's restart comes up
    let _up = Up::start(&home)?;
    ok_json(&home, &["space", "list"])?;
    Ok(())
}

/// Polls a CLI read until it matches, within the test timeout (each poll is
/// a full CLI round trip; there is no event to wait on across processes).
fn until(home: &Path, args: &[&str], pred: impl Fn(&Value) -> bool) -> Result<Value> {
    until_within(home, args, pred, Duration::from_secs(20))
}

fn until_within(
    home: &Path,
    args: &[&str],
    pred: impl Fn(&Value) -> bool,
    limit: Duration,
) -> Result<Value> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Ok(v) = ok_json(home, args) {
            if pred(&v) {
                return Ok(v);
            }
        }
        if std::time::Instant::now() > deadline {
            bail!("shoal {args:?} never matched");
        }
        std::thread::yield_now();
    }
}

#[test]
fn two_devices_through_the_cli_with_a_grant_file() -> Result<()> {
    let t = tempfile::tempdir()?;
    let (ha, hb) = (t.path().join("laptop"), t.path().join("desk"));
    ok_json(&ha, &["init", "--name", "laptop"])?;
    ok_json(&hb, &["init", "--name", "desk"])?;
    let a = Up::start(&ha)?;
    let a_addr = a.info["listen_addrs"][0]
        .as_str()
        .context("no addr")?
        .to_string();
    let b = Up::start_with(&hb, &["--peer", &a_addr])?;
    let b_id = b.info["device_id"].as_str().context("no id")?.to_string();
    ok_json(&ha, &["space", "create", "notes"])?;
    ok_json(
        &ha,
        &[
            "member", "notes", &b_id, "--role", "editor", "--name", "desk",
        ],
    )?;
    let grant = t.path().join("grant.json");
    ok_json(
        &ha,
        &[
            "space",
            "grant",
            "notes",
            "--out",
            grant.to_str().context("path")?,
        ],
    )?;
    ok_json(&hb, &["space", "import", grant.to_str().context("path")?])?;
    ok_json(
        &ha,
        &["doc", "put", "notes", "todo", "/items/0", "\"from laptop\""],
    )?;
    until(&hb, &["doc", "get", "notes", "todo"], |v| {
        v["items"][0] == "from laptop"
    })?;
    // The members document syncs on its own, maybe after `todo`; until it
    // is here, the desk refuses to write (it cannot check its role).
    until(&hb, &["members", "notes"], |v| {
        v.as_array().is_some_and(|m| m.len() == 2)
    })?;
    ok_json(
        &hb,
        &["doc", "put", "notes", "todo", "/items/-", "\"from desk\""],
    )?;
    let v = until(&ha, &["doc", "get", "notes", "todo"], |v| {
        v["items"][1] == "from desk"
    })?;
    assert_eq!(v, json!({"items": ["from laptop", "from desk"]}));
    // `shoal peers`: b, directly connected, sharing "notes"
    let peers = ok_json(&ha, &["peers"])?;
    let p = peers
        .as_array()
        .and_then(|a| a.iter().find(|p| p["peer"] == b_id.as_str()))
        .with_context(|| format!("b not among {peers}"))?;
    assert_eq!(p["spaces"], json!(["notes"]), "{p}");
    assert_eq!(p["relayed"], false, "{p}");
    let text = shoal(&ha, &["peers"])?;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("direct") && text.contains("spaces: notes"),
        "{text}"
    );
    // the joiner cannot hand out the key: only owners can
    assert!(err_text(&hb, &["space", "grant", "notes", "--out", "/dev/null"])?.contains("owner"));
    Ok(())
}

#[test]
fn invite_join_roles_and_revoke_through_the_cli() -> Result<()> {
    let t = tempfile::tempdir()?;
    let homes: Vec<PathBuf> = ["laptop", "desk", "phone"]
        .iter()
        .map(|n| t.path().join(n))
        .collect();
    for (h, n) in homes.iter().zip(["laptop", "desk", "phone"]) {
        ok_json(h, &["init", "--name", n])?;
    }
    let (ha, hb, hc) = (&homes[0], &homes[1], &homes[2]);
    let _a = Up::start(ha)?;
    let _b = Up::start(hb)?;
    let c = Up::start(hc)?;
    let c_id = c.info["device_id"].as_str().context("no id")?.to_string();
    ok_json(ha, &["space", "create", "notes"])?;
    ok_json(ha, &["doc", "put", "notes", "todo", "/items/0", "\"milk\""])?;

    // an editor joins with nothing but the code
    let inv = ok_json(
        ha,
        &["invite", "notes", "--role", "editor", "--expires", "1h"],
    )?;
    let code = inv["code"].as_str().context("no code")?.to_string();
    assert!(code.starts_with("shoal1"));
    // a mistyped code is caught locally, with a message that says so
    let mut typo = code.clone().into_bytes();
    let i = typo.len() - 10;
    typo[i] = if typo[i] == b'q' { b'p' } else { b'q' };
    let e = err_text(hb, &["join", std::str::from_utf8(&typo)?])?;
    assert!(e.contains("typo"), "{e}");
    let joined = ok_json(hb, &["join", &code, "--timeout", "20s"])?;
    assert_eq!(joined["name"], "notes");
    assert_eq!(joined["role"], "editor");
    assert!(
        until(hb, &["doc", "get", "notes", "todo"], |v| v["items"][0]
            == "milk")
        .is_ok()
    );
    ok_json(hb, &["doc", "put", "notes", "todo", "/items/-", "\"eggs\""])?;
    until(ha, &["doc", "get", "notes", "todo"], |v| {
        v["items"][1] == "eggs"
    })?;
    // used up
    let e = err_text(hc, &["join", &code])?;
    assert!(e.contains("already been used"), "{e}");
    // a cancelled code
    let inv2 = ok_json(ha, &["invite", "notes", "--role", "viewer"])?;
    ok_json(
        ha,
        &[
            "invite",
            "cancel",
            "notes",
            inv2["id"].as_str().context("id")?,
        ],
    )?;
    let e = err_text(hc, &["join", inv2["code"].as_str().context("code")?])?;
    assert!(e.contains("cancelled"), "{e}");

    // a viewer: its CLI refuses writes
    let inv3 = ok_json(ha, &["invite", "notes", "--role", "viewer"])?;
    let j = ok_json(hc, &["join", inv3["code"].as_str().context("code")?])?;
    assert_eq!(j["role"], "viewer");
    let e = err_text(hc, &["doc", "put", "notes", "todo", "/x", "1"])?;
    assert!(e.contains("viewer"), "{e}");
    let members = ok_json(ha, &["members", "notes"])?;
    assert_eq!(members.as_array().map(Vec::len), Some(3));

    // revoke the phone: the others keep syncing, it gets nothing new
    let r = ok_json(ha, &["revoke", "notes", &c_id])?;
    assert_eq!(r["epoch"], 1);
    until(hb, &["space", "list"], |v| v[0]["epoch"] == 1)?;
    ok_json(hb, &["doc", "put", "notes", "todo", "/secret", "\"after\""])?;
    until(ha, &["doc", "get", "notes", "todo"], |v| {
        v["secret"] == "after"
    })?;
    let leaked = until_within(
        hc,
        &["doc", "get", "notes", "todo"],
        |v| v["secret"] == "after",
        Duration::from_secs(3),
    );
    assert!(leaked.is_err(), "the revoked phone got a later change");
    assert!(err_text(hb, &["revoke", "notes", &c_id])?.contains("owner"));
    Ok(())
}

#[test]
fn watch_json_prints_one_event_per_line() -> Result<()> {
    let t = tempfile::tempdir()?;
    let h = t.path().join("solo");
    ok_json(&h, &["init", "--name", "solo"])?;
    let _up = Up::start(&h)?;
    ok_json(&h, &["space", "create", "notes"])?;
    let mut watch = Command::new(shoal_bin()?)
        .arg("--home")
        .arg(&h)
        .args(["--json", "watch", "notes", "--type", "doc", "--doc", "to*"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = watch.stdout.take().context("stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout)
            .lines()
            .map_while(std::result::Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The stream may attach after a write: keep writing until a line comes.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let line = loop {
        ok_json(&h, &["doc", "put", "notes", "other", "/x", "1"])?;
        ok_json(&h, &["doc", "put", "notes", "todo", "/x", "1"])?;
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            break l;
        }
        if std::time::Instant::now() > deadline {
            let _ = watch.kill();
            bail!("`shoal watch` printed nothing");
        }
    };
    let _ = watch.kill();
    let _ = watch.wait();
    let v: Value = serde_json::from_str(&line)?;
    assert_eq!(v["type"], "doc_changed");
    assert_eq!(
        v["doc"], "todo",
        "the doc filter let another document through"
    );
    assert_eq!(v["origin"], "local");
    Ok(())
}

/// `shoal watch --json --type file` on a home: the node's own file events,
/// read on a thread, so tests wait for a placement instead of polling.
struct FileEvents {
    child: Child,
    rx: mpsc::Receiver<String>,
}

impl FileEvents {
    fn watch(home: &Path) -> Result<Self> {
        let mut child = Command::new(shoal_bin()?)
            .arg("--home")
            .arg(home)
            .args(["--json", "watch", "--type", "file"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout)
                .lines()
                .map_while(std::result::Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self { child, rx })
    }

    /// Returns once `path` holds `len` bytes, looking again on every file
    /// event (and every 500 ms, as the stream may attach after the event it
    /// waits for, like the in-process harness's `wait_for`).
    fn wait_for(&self, path: &Path, len: u64, limit: Duration) -> Result<()> {
        let done = || std::fs::metadata(path).is_ok_and(|m| m.len() == len);
        let deadline = std::time::Instant::now() + limit;
        while !done() {
            if std::time::Instant::now() > deadline {
                bail!("{} never held {len} bytes", path.display());
            }
            let _ = self.rx.recv_timeout(Duration::from_millis(500));
        }
        Ok(())
    }
}

impl Drop for FileEvents {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic incompressible bytes (xorshift), without a dependency.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn folder_sync_through_the_cli_resumes_after_kill9_without_refetching() -> Result<()> {
    let t = tempfile::tempdir()?;
    let (ha, hb) = (t.path().join("laptop"), t.path().join("desk"));
    let (fa, fb) = (t.path().join("Photos-a"), t.path().join("Photos-b"));
    let a = Up::start(&ha)?;
    let _ = &a;
    let b = Up::start(&hb)?;
    ok_json(
        &ha,
        &[
            "space",
            "create",
            "photos",
            "--folder",
            fa.to_str().context("utf8")?,
        ],
    )?;
    let inv = ok_json(&ha, &["invite", "photos"])?;
    let code = inv["code"].as_str().context("no code")?;
    ok_json(
        &hb,
        &[
            "join",
            code,
            "--folder",
            fb.to_str().context("utf8")?,
            "--timeout",
            "20s",
        ],
    )?;

    // a small file, then status, ls and conflicts through the CLI
    let placed = FileEvents::watch(&hb)?;
    std::fs::write(fa.join("hello.txt"), b"hi")?;
    placed.wait_for(&fb.join("hello.txt"), 2, Duration::from_secs(20))?;
    assert_eq!(std::fs::read(fb.join("hello.txt"))?, b"hi");
    until(&hb, &["ls", "photos"], |v| v[0]["path"] == "hello.txt")?;
    let st = ok_json(&hb, &["status"])?;
    assert_eq!(st["spaces"][0]["name"], "photos");
    assert!(st["spaces"][0]["folder"]["path"]
        .as_str()
        .is_some_and(|p| p.ends_with("Photos-b")));
    assert_eq!(ok_json(&hb, &["conflicts", "photos"])?, json!([]));
    let text = shoal(&hb, &["status"])?;
    assert!(String::from_utf8_lossy(&text.stdout).contains("photos"));

    // a large file; the receiver is killed with SIGKILL halfway through
    let size = 300usize << 20;
    std::fs::write(fa.join("big.bin"), noise(size, 42))?;
    drop(b);
    let b = Up::start(&hb)?;
    until_within(
        &hb,
        &["status"],
        |v| v["counters"]["bytes_fetched"].as_u64().unwrap_or(0) > 40 << 20,
        Duration::from_secs(60),
    )?;
    b.kill9()?;
    let served_before = ok_json(&ha, &["status"])?["counters"]["bytes_served"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        served_before < size as u64,
        "the transfer finished before the kill"
    );
    let _b = Up::start(&hb)?;
    FileEvents::watch(&hb)?.wait_for(&fb.join("big.bin"), size as u64, Duration::from_secs(120))?;
    assert!(
        std::fs::read(fb.join("big.bin"))? == noise(size, 42),
        "content differs"
    );
    // chunks written before the kill were not requested again: at most the
    // requests in flight at the kill (64 chunks of at most 512 KiB) repeat
    let served = ok_json(&ha, &["status"])?["counters"]["bytes_served"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        served <= (size as u64) + 2 + (64 << 19),
        "served {served} bytes for a {size}-byte file"
    );
    let after = ok_json(&hb, &["status"])?;
    assert!(
        after["counters"]["chunks_resumed"].as_u64().unwrap_or(0) > 0,
        "{after}"
    );
    Ok(())
}

/// Issue 20 through the CLI: `history`, `restore --version`, `trash`, a
/// deleted file restored, `snapshot`/`snapshots`, and clear errors for a
/// bad time and an unknown version.
#[test]
fn history_trash_restore_and_snapshots_through_the_cli() -> Result<()> {
    let t = tempfile::tempdir()?;
    let (ha, hb) = (t.path().join("laptop"), t.path().join("desk"));
    let (fa, fb) = (t.path().join("Notes-a"), t.path().join("Notes-b"));
    let _a = Up::start(&ha)?;
    let _b = Up::start(&hb)?;
    let fa_s = fa.to_str().context("utf8")?;
    ok_json(&ha, &["space", "create", "notes", "--folder", fa_s])?;
    let inv = ok_json(&ha, &["invite", "notes"])?;
    let code = inv["code"].as_str().context("no code")?;
    let fb_s = fb.to_str().context("utf8")?;
    ok_json(&hb, &["join", code, "--folder", fb_s, "--timeout", "20s"])?;

    let placed = FileEvents::watch(&hb)?;
    std::fs::write(fa.join("plan.txt"), b"first plan")?;
    std::fs::write(fa.join("old.txt"), b"to be deleted")?;
    placed.wait_for(&fb.join("plan.txt"), 10, Duration::from_secs(20))?;
    placed.wait_for(&fb.join("old.txt"), 13, Duration::from_secs(20))?;
    std::fs::write(fa.join("plan.txt"), b"second plan, longer")?;
    std::fs::remove_file(fa.join("old.txt"))?;
    placed.wait_for(&fb.join("plan.txt"), 19, Duration::from_secs(20))?;

    let h = until(&hb, &["history", "notes", "plan.txt"], |v| {
        v.as_array().is_some_and(|a| a.len() >= 2)
    })?;
    let first = h
        .as_array()
        .and_then(|a| a.iter().find(|x| x["size"] == 10))
        .context("no first version")?;
    assert_eq!(first["content"], "kept", "{h}");
    let n = first["version"].as_u64().context("version")?.to_string();
    let text = shoal(&hb, &["history", "notes", "plan.txt"])?;
    assert!(String::from_utf8_lossy(&text.stdout).contains("kept here"));

    ok_json(&hb, &["snapshot", "notes", "before restore"])?;
    let snaps = ok_json(&hb, &["snapshots", "notes"])?;
    assert_eq!(snaps[0]["name"], "before restore", "{snaps}");
    let e = err_text(&hb, &["snapshot", "notes", "before restore"])?;
    assert!(e.contains("exists already"), "{e}");

    let r = ok_json(&hb, &["restore", "notes", "plan.txt", "--version", &n])?;
    assert_eq!(r["restored"], json!(["plan.txt"]), "{r}");
    let back = FileEvents::watch(&ha)?;
    back.wait_for(&fa.join("plan.txt"), 10, Duration::from_secs(20))?;
    assert_eq!(std::fs::read(fa.join("plan.txt"))?, b"first plan");

    let trash = until(&hb, &["trash", "notes"], |v| v[0]["path"] == "old.txt")?;
    assert_eq!(trash[0]["content"], "kept", "{trash}");
    ok_json(&hb, &["restore", "notes", "old.txt"])?;
    back.wait_for(&fa.join("old.txt"), 13, Duration::from_secs(20))?;

    let e = err_text(&hb, &["restore", "notes", "--at", "yesterday"])?;
    assert!(e.contains("cannot read the time"), "{e}");
    let e = err_text(&hb, &["restore", "notes", "plan.txt", "--version", "99"])?;
    assert!(e.contains("has no version 99"), "{e}");
    Ok(())
}
