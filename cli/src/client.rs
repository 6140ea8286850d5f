//! The CLI's client of a running node's local API: finds it through the
//! home's `api.addr` and authenticates with the home's token.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use shoal_node::Home;

pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
    home: String,
}

impl Client {
    pub fn new(home: &Home) -> Result<Self> {
        let not_running = || {
            anyhow!(
                "no shoal node is running on {}; start one with `shoal up`{}",
                home.dir().display(),
                if home.exists() {
                    ""
                } else {
                    " (it will initialise this home)"
                }
            )
        };
        let addr = std::fs::read_to_string(home.api_addr_path()).map_err(|_| not_running())?;
        let token = home.api_token().context("read the API token")?;
        Ok(Self {
            base: format!("http://{}", addr.trim()),
            token,
            http: reqwest::Client::new(),
            home: home.dir().display().to_string(),
        })
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value> {
        let resp = req.bearer_auth(&self.token).send().await.map_err(|e| {
            if e.is_connect() {
                anyhow!(
                    "no shoal node is running on {} (its API does not answer); start one with `shoal up`",
                    self.home
                )
            } else {
                anyhow!("API request failed: {e}")
            }
        })?;
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .context("the API answered with something that is not JSON")?;
        if !status.is_success() {
            bail!("{}", body["error"].as_str().unwrap_or(status.as_str()));
        }
        Ok(body)
    }

    /// Opens a server-sent event stream.
    pub async fn stream(&self, path: &str) -> Result<reqwest::Response> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| {
                anyhow!(
                    "no shoal node is running on {} ({e}); start one with `shoal up`",
                    self.home
                )
            })?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body: Value = resp.json().await.unwrap_or_default();
            bail!("{}", body["error"].as_str().unwrap_or(status.as_str()));
        }
        Ok(resp)
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    /// A POST that may take up to `t` on the node's side.
    pub async fn post_with_timeout(
        &self,
        path: &str,
        body: Value,
        t: std::time::Duration,
    ) -> Result<Value> {
        self.send(
            self.http
                .post(format!("{}{path}", self.base))
                .json(&body)
                .timeout(t + std::time::Duration::from_secs(10)),
        )
        .await
    }

    pub async fn put(&self, path: &str, body: Value) -> Result<Value> {
        self.send(self.http.put(format!("{}{path}", self.base)).json(&body))
            .await
    }

    pub async fn delete(&self, path: &str, body: Value) -> Result<Value> {
        self.send(self.http.delete(format!("{}{path}", self.base)).json(&body))
            .await
    }
}
