//! The local HTTP API through the real router on a real node: the OpenAPI
//! description is the one checked in and matches what is served, and bad
//! requests get JSON errors with the right status codes.

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use shoal_tests::*;

fn checked_in() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json")
}

/// `docs/openapi.json` is what the code generates. `SHOAL_BLESS=1 cargo
/// test -p shoal-tests openapi` rewrites it after an API change.
#[test]
fn the_checked_in_openapi_description_is_current() -> Result<()> {
    let spec = serde_json::to_string_pretty(&shoal_node::api::openapi())? + "\n";
    let path = checked_in();
    if std::env::var_os("SHOAL_BLESS").is_some() {
        std::fs::write(&path, &spec).with_context(|| format!("write {}", path.display()))?;
    }
    let on_disk =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    ensure!(
        on_disk == spec,
        "{} is stale: run `SHOAL_BLESS=1 cargo test -p shoal-tests openapi` and commit it",
        path.display()
    );
    Ok(())
}

/// Every operation the description names is served: a request to it never
/// meets the router's "no endpoint" or a 405, and every one naming an
/// unknown space is a JSON 404 that names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_described_operation_is_served() -> Result<()> {
    let n = spawn_nodes(1).await?;
    let node = &n[0].node;
    node.create_space("notes").await?;
    let (base, _stop) = serve_api(node).await?;
    let http = reqwest::Client::new();

    // the description itself needs no token and is the generated one
    let served: Value = http
        .get(format!("{base}/v1/openapi.json"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(served, serde_json::to_value(shoal_node::api::openapi())?);

    let paths = served["paths"].as_object().context("no paths")?;
    ensure!(paths.len() >= 20, "only {} paths described", paths.len());
    let mut checked = 0;
    for (template, ops) in paths {
        let url = template
            .replace("{space}", "nope")
            .replace("{doc}", "todo")
            .replace("{device}", &node.device_id().to_string())
            .replace("{id}", "00");
        for method in ops.as_object().context("operations")?.keys() {
            let Ok(m) = method.to_uppercase().parse::<reqwest::Method>() else {
                continue;
            };
            let mut req = http
                .request(m.clone(), format!("{base}{url}"))
                .bearer_auth(API_TOKEN);
            if ops[method].get("requestBody").is_some() {
                req = req.json(&json!({}));
            }
            let r = req.send().await?;
            let status = r.status();
            if url == "/v1/events" {
                assert_eq!(status, 200);
                continue; // a stream; dropping it closes it
            }
            let body = r.text().await?;
            assert_ne!(status, 405, "{m} {url}: {body}");
            assert!(!body.contains("no endpoint"), "{m} {url}: {body}");
            if status.is_client_error() || status.is_server_error() {
                let v: Value = serde_json::from_str(&body)
                    .with_context(|| format!("{m} {url}: error not JSON: {body}"))?;
                assert!(v["error"].is_string(), "{m} {url}: {v}");
            }
            // an unknown space is named; bodies are checked before the space
            // is looked up, so only operations without one reach the lookup
            if url.contains("nope") && ops[method].get("requestBody").is_none() {
                assert_eq!(status, 404, "{m} {url}: {body}");
                assert!(body.contains("nope"), "{m} {url}: {body}");
            }
            checked += 1;
        }
    }
    ensure!(checked >= 25, "only {checked} operations checked");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_errors_with_fitting_codes() -> Result<()> {
    let n = spawn_nodes(1).await?;
    let node = &n[0].node;
    node.create_space("notes").await?;
    let (base, _stop) = serve_api(node).await?;
    let http = reqwest::Client::new();
    let error = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let v: Value = r.json().await?;
        let e = v["error"].as_str().context("no error field")?.to_string();
        anyhow::Ok((status, e))
    };

    // no token, a wrong one, a token of the right length but wrong
    let r = http.get(format!("{base}/v1/status")).send().await?;
    assert_eq!(error(r).await?.0, 401);
    for t in ["nope", "t0ken-for-tests-0123456789abcdeF"] {
        let r = http
            .get(format!("{base}/v1/status"))
            .bearer_auth(t)
            .send()
            .await?;
        assert_eq!(error(r).await?.0, 401, "token {t}");
    }
    // an endpoint that does not exist
    let r = http
        .get(format!("{base}/v1/nothing"))
        .bearer_auth(API_TOKEN)
        .send()
        .await?;
    let (code, e) = error(r).await?;
    assert_eq!((code, e.contains("/v1/nothing")), (404, true), "{e}");
    // a body that is not JSON, and one missing a field
    let r = http
        .post(format!("{base}/v1/spaces"))
        .bearer_auth(API_TOKEN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await?;
    assert_eq!(error(r).await?.0, 400);
    let r = http
        .post(format!("{base}/v1/spaces"))
        .bearer_auth(API_TOKEN)
        .json(&json!({"folder": "/tmp"}))
        .send()
        .await?;
    let (code, e) = error(r).await?;
    assert_eq!((code, e.contains("name")), (422, true), "{e}");
    // a space that exists already
    let r = http
        .post(format!("{base}/v1/spaces"))
        .bearer_auth(API_TOKEN)
        .json(&json!({"name": "notes"}))
        .send()
        .await?;
    assert_eq!(error(r).await?.0, 409);
    // a bad role, a bad device id, a malformed invite code
    let r = http
        .post(format!("{base}/v1/spaces/notes/invites"))
        .bearer_auth(API_TOKEN)
        .json(&json!({"role": "emperor"}))
        .send()
        .await?;
    let (code, e) = error(r).await?;
    assert_eq!((code, e.contains("emperor")), (400, true), "{e}");
    let r = http
        .put(format!("{base}/v1/spaces/notes/members/xyz"))
        .bearer_auth(API_TOKEN)
        .json(&json!({"role": "viewer"}))
        .send()
        .await?;
    assert_eq!(error(r).await?.0, 400);
    let r = http
        .post(format!("{base}/v1/join"))
        .bearer_auth(API_TOKEN)
        .json(&json!({"code": "shoal1-garbage", "timeout_secs": 1}))
        .send()
        .await?;
    assert_eq!(error(r).await?.0, 400);
    // an unknown document is a 404 naming it; a relative folder a 400
    let r = http
        .get(format!("{base}/v1/spaces/notes/docs/ghost"))
        .bearer_auth(API_TOKEN)
        .send()
        .await?;
    let (code, e) = error(r).await?;
    assert_eq!((code, e.contains("ghost")), (404, true), "{e}");
    let r = http
        .put(format!("{base}/v1/spaces/notes/folder"))
        .bearer_auth(API_TOKEN)
        .json(&json!({"path": "relative/dir"}))
        .send()
        .await?;
    assert_eq!(error(r).await?.0, 400);
    // the API cannot be bound beyond loopback
    for addr in ["0.0.0.0:0", "[::]:0"] {
        let r =
            shoal_node::api::serve(node.clone(), API_TOKEN.into(), addr.parse()?, async {}).await;
        let e = r.err().context("bound a non-loopback address")?.to_string();
        assert!(e.contains("loopback"), "{e}");
    }
    // nothing above changed the node
    assert_eq!(node.spaces().await?.len(), 1);
    assert!(node.docs("notes").await?.is_empty());
    Ok(())
}

/// An empty or short token would let any local process in: with an empty
/// `api-token` file a request with no `Authorization` header matched it.
/// The API refuses to start with one, and the home refuses to hand it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_does_not_start_with_an_empty_or_short_token() -> Result<()> {
    let n = spawn_nodes(1).await?;
    let node = &n[0].node;
    for t in ["", "   ", "short"] {
        let r = shoal_node::api::serve(
            node.clone(),
            t.into(),
            "127.0.0.1:0".parse()?,
            std::future::pending(),
        )
        .await;
        match r {
            Ok((addr, _task)) => {
                let status = reqwest::get(format!("http://{addr}/v1/status"))
                    .await?
                    .status();
                anyhow::bail!(
                    "the API started with the token {t:?}; a request without one got {status}"
                );
            }
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("token"), "{e}");
            }
        }
    }
    // a home whose token file is empty names the file
    std::fs::write(n[0].home.dir().join("api-token"), b"\n")?;
    let e = n[0].home.api_token().err().context("read an empty token")?;
    let e = e.to_string();
    assert!(e.contains("api-token") && e.contains("short"), "{e}");
    Ok(())
}

/// DNS rebinding: a web page whose name resolves to 127.0.0.1 reaches the
/// API with its own name in `Host`. Only loopback names are served; the
/// check runs before auth, so even the public description is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_with_a_foreign_host_header_are_refused() -> Result<()> {
    let n = spawn_nodes(1).await?;
    let node = &n[0].node;
    let (base, _stop) = serve_api(node).await?;
    let port = base.rsplit(':').next().context("no port")?.to_string();
    let http = reqwest::Client::new();
    for host in [
        format!("evil.example:{port}"),
        "evil.example".to_string(),
        format!("127.0.0.1.evil.example:{port}"),
        format!("localhost.evil.example:{port}"),
        format!("0.0.0.0:{port}"),
    ] {
        for path in ["/v1/status", "/v1/openapi.json", "/v1/nothing"] {
            let r = http
                .get(format!("{base}{path}"))
                .header("host", &host)
                .bearer_auth(API_TOKEN)
                .send()
                .await?;
            let status = r.status();
            let body: Value = r
                .json()
                .await
                .with_context(|| format!("Host {host} {path}: {status}, not JSON"))?;
            assert_eq!(status, 403, "Host {host} {path}: {body}");
            let e = body["error"].as_str().context("no error field")?;
            assert!(e.contains("Host"), "{e}");
        }
    }
    // loopback names, with and without the port, are served
    for host in [
        format!("127.0.0.1:{port}"),
        "127.0.0.1".to_string(),
        format!("localhost:{port}"),
        format!("LocalHost:{port}"),
        format!("[::1]:{port}"),
        "[::1]".to_string(),
    ] {
        let r = http
            .get(format!("{base}/v1/status"))
            .header("host", &host)
            .bearer_auth(API_TOKEN)
            .send()
            .await?;
        assert_eq!(r.status(), 200, "Host {host}");
    }
    Ok(())
}
