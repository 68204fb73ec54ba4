//! The CLI's HTTP client of the control API: finds the token, sends requests,
//! and turns the server's `{"error": ...}` answers into readable failures.

use std::path::Path;

use anyhow::{Context, anyhow};
use reqwest::{Method, RequestBuilder, Response};
use serde::de::DeserializeOwned;

pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// A client of `server` (`http://` or `https://`). An HTTPS server's
    /// certificate must come from the system's CAs or from `ca_cert` (PEM).
    pub fn new(
        server: &str,
        token: Option<String>,
        ca_cert: Option<&Path>,
    ) -> anyhow::Result<Client> {
        let base = server.trim_end_matches('/').to_string();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            anyhow::bail!("--server {server:?} must start with http:// or https://");
        }
        let mut http = reqwest::Client::builder();
        if let Some(path) = ca_cert {
            let pem = std::fs::read(path)
                .with_context(|| format!("cannot read --ca-cert {}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).with_context(|| {
                format!(
                    "--ca-cert {} is not a PEM certificate bundle",
                    path.display()
                )
            })?;
            anyhow::ensure!(
                !certs.is_empty(),
                "--ca-cert {} holds no certificate (expected PEM \"BEGIN CERTIFICATE\" blocks)",
                path.display()
            );
            for cert in certs {
                http = http.add_root_certificate(cert);
            }
        }
        let http = http
            .build()
            .context("cannot set up the HTTP client (TLS roots)")?;
        let token = token.or_else(|| {
            std::fs::read_to_string(Path::new("ferry-data").join("admin-token"))
                .ok()
                .map(|t| t.trim().to_string())
        });
        Ok(Client { base, token, http })
    }

    /// The server's base URL, without a trailing slash.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The token requests carry, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The HTTP client itself (TLS roots set up), for load generators.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let rb = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// Sends a request and decodes a JSON answer; an error answer becomes the
    /// server's message.
    pub async fn send<T: DeserializeOwned>(
        &self,
        rb: RequestBuilder,
    ) -> anyhow::Result<(reqwest::StatusCode, T)> {
        let resp = self.send_raw(rb).await?;
        let status = resp.status();
        let body = resp.bytes().await.context("reading the server's answer")?;
        let value = serde_json::from_slice(&body).with_context(|| {
            format!(
                "the server's answer is not the expected JSON: {}",
                String::from_utf8_lossy(&body)
            )
        })?;
        Ok((status, value))
    }

    /// Sends a request; returns the answer as the server wrote it (what
    /// `-o json` prints) and decoded into the crate's own type `T` (what
    /// people are shown).
    pub async fn send_typed<T: DeserializeOwned>(
        &self,
        rb: RequestBuilder,
    ) -> anyhow::Result<(serde_json::Value, T)> {
        let (_, value): (_, serde_json::Value) = self.send(rb).await?;
        let typed: T = serde::Deserialize::deserialize(&value).with_context(|| {
            format!(
                "the server's answer is not the expected {}: {value}",
                std::any::type_name::<T>()
            )
        })?;
        Ok((value, typed))
    }

    pub async fn send_raw(&self, rb: RequestBuilder) -> anyhow::Result<Response> {
        let resp = rb.send().await.map_err(|e| {
            if e.is_connect() {
                anyhow!(
                    "cannot reach Ferry at {}: is `ferry serve` running? (choose the server with --server or FERRY_SERVER; for https, trust its certificate with --ca-cert)\n  cause: {}",
                    self.base,
                    error_chain(&e)
                )
            } else {
                anyhow!("request to {} failed: {e}", self.base)
            }
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        if status == reqwest::StatusCode::UNAUTHORIZED && self.token.is_none() {
            anyhow::bail!(
                "{message}\n(no token found: pass --token, set FERRY_TOKEN, or run from the directory that holds ferry-data/)"
            );
        }
        anyhow::bail!("{message} (HTTP {})", status.as_u16())
    }
}

/// An error with its causes, `a: b: c` (reqwest hides the TLS reason in them).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
