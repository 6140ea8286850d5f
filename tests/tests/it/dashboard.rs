//! The dashboard in a real browser: Debian's `chromium`, headless, driven
//! through `chromedriver` with fantoccini (WebDriver), against two real
//! nodes and the real API server. The browser resolves no name but
//! 127.0.0.1 (`--host-resolver-rules`) and has its background networking
//! off, so it loads only the node's loopback address.
//!
//! Needs `chromium` and `chromedriver` (Debian: `chromium`,
//! `chromium-driver`; `.ci/run` installs them). Without them the test says
//! so and passes, except under `CI`, where it fails.
//! `SHOAL_SCREENSHOTS=1` writes the screenshots to `docs/` (the README
//! shows them).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use shoal_tests::*;

/// Whether the browser can run here; says why not (and fails under CI).
fn browser_ready() -> Result<bool> {
    let missing: Vec<&str> = ["chromium", "chromedriver"]
        .into_iter()
        .filter(|b| {
            std::process::Command::new(b)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_err()
        })
        .collect();
    if missing.is_empty() {
        return Ok(true);
    }
    ensure!(
        std::env::var_os("CI").is_none(),
        "the dashboard test cannot run under CI: no {} on PATH",
        missing.join(", ")
    );
    eprintln!(
        "skipping the dashboard browser test: no {} on PATH (Debian: apt install chromium chromium-driver)",
        missing.join(", ")
    );
    Ok(false)
}

/// chromedriver on a free loopback port, and a headless Chromium session.
struct Browser {
    _driver: tokio::process::Child,
    client: Client,
}

impl Browser {
    async fn start() -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let driver = tokio::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start chromedriver")?;
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        tokio::time::timeout(TIMEOUT, async {
            loop {
                if http.get(format!("{url}/status")).send().await.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .context("chromedriver did not come up")?;
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--no-first-run",
                "--window-size=1280,1100",
            ]}),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&url)
            .await
            .context("start a chromium session")?;
        Ok(Self {
            _driver: driver,
            client,
        })
    }

    /// Waits until `js` (a function body) returns a truthy value; returns it.
    async fn until(&self, what: &str, js: &str) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + TIMEOUT * 2;
        let mut last = Value::Null;
        while tokio::time::Instant::now() < deadline {
            last = self.client.execute(js, vec![]).await?;
            let truthy = match &last {
                Value::Null | Value::Bool(false) => false,
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return Ok(last);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("timed out waiting for {what} (last: {last})")
    }

    /// Clicks the element `css` names, finding it again if the page redrew
    /// it between finding and clicking.
    async fn click(&self, css: &str) -> Result<()> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let r = match self.client.find(Locator::Css(css)).await {
                Ok(e) => e.click().await,
                Err(e) => Err(e),
            };
            match r {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing_note(css, &e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e).with_context(|| format!("click {css}")),
            }
        }
    }

    async fn screenshot(&self, name: &str) -> Result<()> {
        let png = self.client.screenshot().await?;
        ensure!(png.starts_with(b"\x89PNG"), "not a PNG");
        if std::env::var_os("SHOAL_SCREENSHOTS").is_some() {
            let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../docs")
                .join(format!("dashboard-{name}.png"));
            std::fs::write(&path, png).with_context(|| format!("write {}", path.display()))?;
        }
        Ok(())
    }
}

fn tracing_note(css: &str, e: &fantoccini::error::CmdError) {
    eprintln!("click {css}: {e}; trying again");
}

async fn login_link(base: &str) -> Result<String> {
    let v: Value = reqwest::Client::new()
        .post(format!("{base}/v1/dashboard/login"))
        .bearer_auth(API_TOKEN)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(v["url"].as_str().context("no url")?.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_in_a_real_browser_from_its_login_link_alone() -> Result<()> {
    if !browser_ready()? {
        return Ok(());
    }
    let n = spawn_nodes(2).await?;
    let (a, b) = (n[0].node.clone(), n[1].node.clone());
    let (base, _stop) = serve_api(&a).await?;
    let browser = Browser::start().await?;
    let c = &browser.client;

    // Without a login link: the page refuses, and so does the API.
    c.goto(&format!("{base}/ui/")).await?;
    browser
        .until(
            "the refusal",
            "return document.getElementById('refused') !== null",
        )
        .await?;
    let status = c
        .execute("return fetch('/v1/spaces').then(r => r.status)", vec![])
        .await?;
    assert_eq!(status, json!(401));

    // With it: the page, this device's name, the live event stream.
    let link = login_link(&base).await?;
    c.goto(&link).await?;
    let device = browser
        .until(
            "this device's name",
            "const d = document.getElementById('device'); \
             return d && d.textContent.includes('·') ? d.textContent : ''",
        )
        .await?;
    ensure!(
        device.as_str().is_some_and(|d| d.contains(a.name())),
        "{device}"
    );
    ensure!(
        !c.current_url().await?.as_str().contains("code="),
        "the login code stays in the address bar"
    );
    browser
        .until(
            "the live stream",
            "return document.getElementById('live').className === 'on'",
        )
        .await?;
    // The session cookie works from the dashboard's own page only: a page
    // on another port of 127.0.0.1 gets the cookie from the browser too,
    // but its requests say where they come from.
    let session = c.get_named_cookie("shoal_session").await?;
    let cookie = format!("shoal_session={}", session.value());
    let host = base.trim_start_matches("http://").to_string();
    let http = reqwest::Client::new();
    let with = |site: &str, origin: Option<&str>| {
        let mut r = http
            .post(format!("{base}/v1/spaces"))
            .header("cookie", &cookie)
            .header("sec-fetch-site", site)
            .json(&json!({"name": format!("from-{site}")}));
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.send()
    };
    let other_port = "http://127.0.0.1:1";
    assert_eq!(with("same-site", Some(other_port)).await?.status(), 401);
    assert_eq!(with("same-origin", Some(other_port)).await?.status(), 401);
    let own = http
        .get(format!("{base}/v1/spaces"))
        .header("cookie", &cookie)
        .header("sec-fetch-site", "same-origin")
        .header("origin", format!("http://{host}"))
        .send()
        .await?;
    assert_eq!(own.status(), 200, "the dashboard's own request");
    ensure!(
        a.spaces().await?.is_empty(),
        "a refused request created a space"
    );
    let no_header = http
        .get(format!("{base}/v1/spaces"))
        .header("cookie", &cookie)
        .send()
        .await?;
    assert_eq!(no_header.status(), 401, "a cookie with no fetch metadata");

    // The link works once.
    c.goto(&link).await?;
    browser
        .until(
            "the used link's refusal",
            "return document.getElementById('refused') !== null",
        )
        .await?;
    c.goto(&format!("{base}/ui/")).await?;
    browser
        .until(
            "the page again",
            "return document.getElementById('create-space') !== null",
        )
        .await?;

    // Create a space from the page.
    c.find(Locator::Css("#space-name"))
        .await?
        .send_keys("photos")
        .await?;
    browser.click("#create-space-btn").await?;
    browser
        .until(
            "the new space",
            "return document.querySelector('section.space[data-name=\"photos\"]') !== null",
        )
        .await?;
    ensure!(
        a.spaces().await?.iter().any(|s| s.name == "photos"),
        "the page did not create the space"
    );

    // Issue an invite: its code and QR code.
    browser
        .click("section.space[data-name=\"photos\"] .invite-btn")
        .await?;
    let code = browser
        .until(
            "the invite code",
            "const e = document.querySelector('section.space[data-name=\"photos\"] .invite-code'); \
             return e ? e.textContent : ''",
        )
        .await?;
    let code = code.as_str().context("code")?.to_string();
    ensure!(code.starts_with("shoal1"), "{code}");
    browser
        .until(
            "the QR code",
            "const i = document.querySelector('img.invite-qr'); \
             return i && i.complete && i.naturalWidth > 0",
        )
        .await?;
    browser.screenshot("invite").await?;

    // Another device joins with that code; both sync a folder; a file
    // written there shows up on the page with its transfer and progress.
    let dirs = tempfile::tempdir()?;
    let (fa, fb) = (dirs.path().join("a"), dirs.path().join("b"));
    a.attach_folder("photos", &fa).await?;
    b.join(&code, TIMEOUT).await?;
    b.attach_folder("photos", &fb).await?;
    let member = format!(
        "return document.querySelector('section.space[data-name=\"photos\"] tr[data-device=\"{}\"]') !== null",
        b.device_id()
    );
    browser.until("the new member", &member).await?;
    // big enough (over 1 MiB) for transfer events
    let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(fb.join("photo.jpg"), &content)?;
    wait_file(&a, &fa.canonicalize()?.join("photo.jpg"), &content).await?;
    browser
        .until(
            "the transfer in the activity list",
            "return document.getElementById('activity').textContent.includes('received photo.jpg')",
        )
        .await?;
    browser
        .until(
            "the folder in sync at 100%",
            "const s = document.querySelector('section.space[data-name=\"photos\"]'); \
             const p = s && s.querySelector('.progress'); \
             return p && p.value === 100 && s.querySelector('.state').textContent === 'in sync'",
        )
        .await?;
    let peer = format!(
        "const r = document.querySelector('#peers tr[data-peer=\"{}\"]'); \
         return r ? r.textContent : ''",
        b.device_id()
    );
    let row = browser.until("the peer", &peer).await?;
    ensure!(row.as_str().is_some_and(|r| r.contains("direct")), "{row}");
    browser.screenshot("spaces").await?;

    // A deleted file is listed with a restore button that brings it back.
    std::fs::remove_file(fb.join("photo.jpg"))?;
    wait_gone(&a, &fa.canonicalize()?.join("photo.jpg")).await?;
    browser
        .until(
            "the deleted file",
            "return document.querySelector('section.space[data-name=\"photos\"] .restore-btn') !== null",
        )
        .await?;
    browser.screenshot("trash").await?;
    browser
        .click("section.space[data-name=\"photos\"] .restore-btn")
        .await?;
    wait_file(&a, &fa.canonicalize()?.join("photo.jpg"), &content).await?;
    wait_file(&b, &fb.canonicalize()?.join("photo.jpg"), &content).await?;

    // The file's history: written, deleted, restored. (Typed and asked
    // for in one step: a redraw between the two would lose the text.)
    browser
        .until(
            "the history form",
            "const s = document.querySelector('section.space[data-name=\"photos\"]'); \
             const i = s && s.querySelector('.history-path'); if (!i) return false; \
             i.value = 'photo.jpg'; s.querySelector('.history-btn').click(); return true",
        )
        .await?;
    browser
        .until(
            "the file's three versions",
            "return document.querySelectorAll('section.space[data-name=\"photos\"] ol.versions li').length >= 3",
        )
        .await?;
    browser.screenshot("history").await?;

    // The owner makes the new member a viewer from the page.
    let demote = format!(
        "const s = document.querySelector('section.space[data-name=\"photos\"] tr[data-device=\"{}\"] select.member-role'); \
         if (!s) return false; s.value = 'viewer'; s.dispatchEvent(new Event('change')); return true",
        b.device_id()
    );
    browser.until("the member's role control", &demote).await?;
    wait_for(&a, TIMEOUT, || async {
        a.members("photos").await.is_ok_and(|ms| {
            ms.iter().any(|m| {
                m.device == b.device_id().to_string() && m.role == shoal_protocol::Role::Viewer
            })
        })
    })
    .await
    .context("the page did not make the member a viewer")?;

    browser.client.clone().close().await?;
    Ok(())
}
