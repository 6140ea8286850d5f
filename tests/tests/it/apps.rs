//! Stock automerge-repo clients (Node.js, `@automerge/automerge-repo` 2.x
//! with its own WebSocket adapter, from `tests/js`) against real nodes
//! through the real API server: documents an app creates reach other
//! devices through shoal's network and roles, concurrent edits merge, a
//! viewer's app is not heard, and a restart loses nothing.
//!
//! Needs `node` and `npm`: the first test to run installs the client from
//! the committed lock file (`npm ci` in `tests/js`, as `.ci/run` does).
//! Without them the tests say so and pass, except under `CI`, where they
//! fail.

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use shoal_node::Node;
use shoal_protocol::{DocId, Role};
use shoal_tests::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("js")
}

/// Whether the JS client can run here; says why not (and fails under CI).
fn js_ready() -> Result<bool> {
    let node = std::process::Command::new("node").arg("--version").output();
    let why = if node.is_err() {
        "no `node` on PATH"
    } else if !js_dir()
        .join("node_modules/@automerge/automerge-repo")
        .exists()
    {
        "tests/js/node_modules is missing (run `npm ci --prefix tests/js`)"
    } else {
        return Ok(true);
    };
    ensure!(
        std::env::var_os("CI").is_none(),
        "automerge-repo client tests cannot run under CI: {why}"
    );
    eprintln!("skipping the automerge-repo client test: {why}");
    Ok(false)
}

/// One stock automerge-repo client process (tests/js/client.mjs).
struct JsClient {
    child: Child,
    stdin: ChildStdin,
    out: Lines<BufReader<ChildStdout>>,
}

impl JsClient {
    async fn start(ws: &str) -> Result<Self> {
        let mut child = Command::new("node")
            .arg(js_dir().join("client.mjs"))
            .arg(ws)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("start node")?;
        let stdin = child.stdin.take().context("client stdin")?;
        let out = BufReader::new(child.stdout.take().context("client stdout")?).lines();
        Ok(Self { child, stdin, out })
    }

    /// Sends one command; its answer, or the client's error.
    async fn call(&mut self, cmd: Value) -> Result<Value> {
        self.stdin.write_all(format!("{cmd}\n").as_bytes()).await?;
        let line = tokio::time::timeout(TIMEOUT * 2, self.out.next_line())
            .await
            .with_context(|| format!("client did not answer {cmd}"))??
            .context("client exited")?;
        let v: Value = serde_json::from_str(&line)?;
        if let Some(e) = v.get("error") {
            bail!("client: {cmd} failed: {e}");
        }
        Ok(v)
    }

    async fn wait(&mut self, url: &str, keys: Value) -> Result<Value> {
        let ms = TIMEOUT.as_millis() as u64;
        let v = self
            .call(json!({"op": "wait", "url": url, "keys": keys, "ms": ms}))
            .await?;
        Ok(v["doc"].clone())
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// The app endpoint of `space` on the API at `base`, as `shoal doc url`
/// prints it.
async fn app_url(base: &str, space: &str) -> Result<String> {
    let v: Value = reqwest::Client::new()
        .get(format!("{base}/v1/spaces/{space}/apps"))
        .bearer_auth(API_TOKEN)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(v["url"].as_str().context("no url")?.to_string())
}

/// The shoal document an `automerge:` URL of an app-made document names.
fn doc_of(url: &str) -> Result<DocId> {
    Ok(url
        .strip_prefix("automerge:")
        .context("not a URL")?
        .parse()?)
}

/// Waits until `node` holds `doc` with `key` set to `value`.
async fn wait_key(node: &Node, space: &str, doc: &DocId, key: &str, value: Value) -> Result<()> {
    wait_for(node, TIMEOUT, || async {
        node.get(space, doc)
            .await
            .is_ok_and(|d| d.get(key) == Some(&value))
    })
    .await
    .with_context(|| format!("{} never had {key} = {value} in {doc}", node.name()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_automerge_repo_clients_share_documents_through_shoal() -> Result<()> {
    if !js_ready()? {
        return Ok(());
    }
    let mut n = spawn_nodes(3).await?;
    let (a, b, c) = (n[0].node.clone(), n[1].node.clone(), n[2].node.clone());
    a.create_space("notes").await?;
    share_space(&a, "notes", &[&b, &c]).await?;
    a.set_role("notes", c.device_id(), Role::Viewer).await?;
    connect(&b, &a).await?;
    connect(&c, &a).await?;
    connect(&c, &b).await?;
    let (api_a, stop_a) = serve_api(&a).await?;
    let (api_b, _stop_b) = serve_api(&b).await?;
    let (api_c, _stop_c) = serve_api(&c).await?;

    // the client on A creates; the document reaches B by shoal's network
    let mut on_a = JsClient::start(&app_url(&api_a, "notes").await?).await?;
    let url = on_a
        .call(json!({"op": "create", "value": {"title": "shopping"}}))
        .await?["url"]
        .as_str()
        .context("no url")?
        .to_string();
    let doc = doc_of(&url)?;
    wait_key(&a, "notes", &doc, "title", json!("shopping")).await?;
    wait_key(&b, "notes", &doc, "title", json!("shopping")).await?;
    // written as A, vouched for by A: B's view of the authors says so
    let mut on_b = JsClient::start(&app_url(&api_b, "notes").await?).await?;
    let found = on_b.call(json!({"op": "find", "url": url})).await?;
    assert_eq!(found["doc"]["title"], "shopping");
    // with a wrong key, or none, the same document is not found
    let right = app_url(&api_b, "notes").await?;
    let (at, _) = right.split_once("key=").context("no key in the address")?;
    for bad in [
        format!("{at}key=00{}", &right[at.len() + 6..]),
        at.trim_end_matches(['?', '&']).to_string(),
    ] {
        let mut wrong = JsClient::start(&bad).await?;
        let r = wrong.call(json!({"op": "find", "url": url})).await;
        ensure!(r.is_err(), "{bad} found the document: {r:?}");
        wrong.stop().await;
    }

    // both edit at once; both see the merge
    let (ra, rb) = tokio::join!(
        on_a.call(json!({"op": "change", "url": url, "key": "from_a", "value": 1})),
        on_b.call(json!({"op": "change", "url": url, "key": "from_b", "value": 2})),
    );
    ra?;
    rb?;
    let merged = json!({"title": "shopping", "from_a": 1, "from_b": 2});
    on_a.wait(&url, merged.clone()).await?;
    on_b.wait(&url, merged.clone()).await?;
    wait_key(&a, "notes", &doc, "from_b", json!(2)).await?;

    // a change through shoal's API arrives live in the apps
    a.put("notes", &doc, "/from_api", json!("x")).await?;
    on_b.wait(&url, json!({"from_api": "x"})).await?;

    // a document made through the API is found by its URL
    let todo: DocId = "todo".parse()?;
    a.put("notes", &todo, "/item", json!("milk")).await?;
    let todo_url: Value = reqwest::Client::new()
        .get(format!("{api_b}/v1/spaces/notes/docs/todo/url"))
        .bearer_auth(API_TOKEN)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let todo_url = todo_url["url"].as_str().context("no url")?.to_string();
    wait_key(&b, "notes", &todo, "item", json!("milk")).await?;
    on_b.wait(&todo_url, json!({"item": "milk"})).await?;

    // a viewer's app reads, and what it writes goes nowhere
    wait_key(&c, "notes", &doc, "from_api", json!("x")).await?;
    let mut on_c = JsClient::start(&app_url(&api_c, "notes").await?).await?;
    on_c.wait(&url, json!({"from_api": "x"})).await?;
    on_c.call(json!({"op": "change", "url": url, "key": "from_viewer", "value": true}))
        .await?;
    // after a later change has come all the way round to the viewer's
    // app, its own change is in no node's copy
    a.put("notes", &doc, "/marker", json!(1)).await?;
    on_c.wait(&url, json!({"marker": 1})).await?;
    wait_key(&c, "notes", &doc, "marker", json!(1)).await?;
    for node in [&a, &b, &c] {
        let d = node.get("notes", &doc).await?;
        ensure!(
            d.get("from_viewer").is_none(),
            "{} took a viewer's app's change: {d}",
            node.name()
        );
    }
    on_c.stop().await;

    // A restarts: nothing is lost, and its apps find everything again
    on_a.stop().await;
    drop(stop_a);
    n[0].restart().await?;
    let a = n[0].node.clone();
    let (api_a, _stop_a) = serve_api(&a).await?;
    let mut again = JsClient::start(&app_url(&api_a, "notes").await?).await?;
    again
        .wait(
            &url,
            json!({"title": "shopping", "from_a": 1, "from_b": 2, "from_api": "x"}),
        )
        .await?;
    again.stop().await;
    on_b.stop().await;
    Ok(())
}

/// Ephemeral messages (presence, cursors) pass between the apps of one
/// device and to the apps of the space's other devices, and are never
/// stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_messages_pass_between_apps_unstored() -> Result<()> {
    if !js_ready()? {
        return Ok(());
    }
    let n = spawn_nodes(2).await?;
    let (a, b) = (n[0].node.clone(), n[1].node.clone());
    a.create_space("notes").await?;
    share_space(&a, "notes", &[&b]).await?;
    connect(&b, &a).await?;
    let (api_a, _stop_a) = serve_api(&a).await?;
    let (api_b, _stop_b) = serve_api(&b).await?;
    let ws_a = app_url(&api_a, "notes").await?;
    let mut one = JsClient::start(&ws_a).await?;
    let mut two = JsClient::start(&ws_a).await?;
    let mut far = JsClient::start(&app_url(&api_b, "notes").await?).await?;
    let url = one.call(json!({"op": "create", "value": {"k": 1}})).await?["url"]
        .as_str()
        .context("no url")?
        .to_string();
    let doc = doc_of(&url)?;
    wait_key(&a, "notes", &doc, "k", json!(1)).await?;
    wait_key(&b, "notes", &doc, "k", json!(1)).await?;
    two.wait(&url, json!({"k": 1})).await?;
    far.wait(&url, json!({"k": 1})).await?;
    // A message may go out before a listener is subscribed: send until
    // each has heard one.
    for (who, listener) in [
        ("an app on the same device", &mut two),
        ("an app on another device", &mut far),
    ] {
        let mut got = None;
        for _ in 0..100 {
            one.call(json!({"op": "broadcast", "url": url, "message": {"cursor": 7}}))
                .await?;
            if let Ok(v) = listener
                .call(json!({"op": "ephemeral", "url": url, "ms": 200}))
                .await
            {
                got = Some(v);
                break;
            }
        }
        let got = got.with_context(|| format!("no ephemeral message reached {who}"))?;
        assert_eq!(got["message"]["cursor"], 7, "{who}");
    }
    for node in [&a, &b] {
        let stored = node.get("notes", &doc).await?;
        ensure!(stored.get("cursor").is_none(), "stored: {stored}");
        assert_eq!(stored, json!({"k": 1}));
    }
    one.stop().await;
    two.stop().await;
    far.stop().await;
    Ok(())
}

/// An app that asks for a document before it has reached this device
/// finds it once it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_asked_for_before_it_arrives_is_found_once_it_has() -> Result<()> {
    if !js_ready()? {
        return Ok(());
    }
    let n = spawn_nodes(2).await?;
    let (a, b) = (n[0].node.clone(), n[1].node.clone());
    a.create_space("notes").await?;
    share_space(&a, "notes", &[&b]).await?;
    let (api_a, _stop_a) = serve_api(&a).await?;
    let (api_b, _stop_b) = serve_api(&b).await?;
    let mut on_a = JsClient::start(&app_url(&api_a, "notes").await?).await?;
    let url = on_a
        .call(json!({"op": "create", "value": {"early": true}}))
        .await?["url"]
        .as_str()
        .context("no url")?
        .to_string();
    let doc = doc_of(&url)?;
    wait_key(&a, "notes", &doc, "early", json!(true)).await?;
    // B is not connected yet: its app does not find the document.
    let mut on_b = JsClient::start(&app_url(&api_b, "notes").await?).await?;
    let r = on_b.call(json!({"op": "find", "url": url})).await;
    ensure!(
        r.is_err(),
        "found a document this device does not have: {r:?}"
    );
    // Once it has reached B, an app there finds it.
    connect(&b, &a).await?;
    wait_key(&b, "notes", &doc, "early", json!(true)).await?;
    let mut again = JsClient::start(&app_url(&api_b, "notes").await?).await?;
    again.wait(&url, json!({"early": true})).await?;
    again.stop().await;
    on_a.stop().await;
    on_b.stop().await;
    Ok(())
}
