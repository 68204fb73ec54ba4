//! Clients of remote Open Inference Protocol servers (Triton, MLServer, KServe,
//! another Ferry): one [`RemoteClient`] per endpoint, sharing one pooled
//! keep-alive HTTP client.

use std::time::Duration;

use reqwest::{StatusCode, Url};
use serde::Deserialize;

use super::RuntimeError;
use super::signature::{Signature, TensorSpec};
use crate::protocol::{self, DataType, Tensor};

/// Where a remote version lives: a server and the model (and version) on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteTarget {
    /// `http://host:port`, no path.
    pub base: String,
    pub model: String,
    pub version: Option<String>,
}

impl RemoteTarget {
    /// Parses `http://host:port` (the model named `default_model` there) or
    /// `http://host:port/v2/models/NAME[/versions/V]`.
    pub fn parse(url: &str, default_model: &str) -> Result<RemoteTarget, String> {
        let parsed = Url::parse(url).map_err(|e| format!("URL {url:?} is not valid: {e}"))?;
        if parsed.scheme() != "http" {
            return Err(format!(
                "URL {url:?}: only http:// endpoints are supported (put TLS in front of Ferry, not behind it)"
            ));
        }
        let host = parsed
            .host_str()
            .ok_or_else(|| format!("URL {url:?} has no host"))?;
        let base = match parsed.port() {
            Some(p) => format!("http://{host}:{p}"),
            None => format!("http://{host}"),
        };
        let segments: Vec<&str> = parsed
            .path_segments()
            .map(|s| s.filter(|x| !x.is_empty()).collect())
            .unwrap_or_default();
        let (model, version) = match segments.as_slice() {
            [] => (default_model.to_string(), None),
            ["v2", "models", name] => (name.to_string(), None),
            ["v2", "models", name, "versions", v] => (name.to_string(), Some(v.to_string())),
            _ => {
                return Err(format!(
                    "URL {url:?}: the path must be empty or /v2/models/NAME[/versions/VERSION]"
                ));
            }
        };
        Ok(RemoteTarget {
            base,
            model,
            version,
        })
    }

    /// `/v2/models/NAME[/versions/V]` on the remote server.
    pub fn model_url(&self) -> String {
        match &self.version {
            Some(v) => format!("{}/v2/models/{}/versions/{}", self.base, self.model, v),
            None => format!("{}/v2/models/{}", self.base, self.model),
        }
    }

    /// The form users write, for display and storage.
    pub fn display(&self) -> String {
        self.model_url()
    }
}

/// Calls one remote endpoint.
pub struct RemoteClient {
    target: RemoteTarget,
    /// Parsed once: parsing a URL on every request showed up in profiles.
    infer_url: Url,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct RemoteMetadata {
    #[serde(default)]
    inputs: Vec<RemoteSpec>,
    #[serde(default)]
    outputs: Vec<RemoteSpec>,
}

#[derive(Deserialize)]
struct RemoteSpec {
    name: String,
    datatype: String,
    shape: Vec<i64>,
}

/// The one HTTP client every remote replica shares (pooled keep-alive).
pub fn http_client(connect_timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .build()
        .expect("the HTTP client builds with static settings")
}

fn unavailable(target: &RemoteTarget, e: reqwest::Error) -> RuntimeError {
    // reqwest's own text ("error sending request for url ...") hides the
    // cause a reader needs: refused, reset, closed early.
    let mut cause = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(inner) = source {
        cause = inner.to_string();
        source = inner.source();
    }
    let why = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        format!("connection failed ({cause})")
    } else {
        format!("request failed ({cause})")
    };
    RuntimeError::Unavailable(format!("remote {} {why}", target.display()))
}

impl RemoteClient {
    pub fn new(target: RemoteTarget, http: reqwest::Client) -> RemoteClient {
        let infer_url = Url::parse(&format!("{}/infer", target.model_url()))
            .expect("a remote target is a valid http URL (checked when it was parsed)");
        RemoteClient {
            target,
            infer_url,
            http,
        }
    }

    pub fn target(&self) -> &RemoteTarget {
        &self.target
    }

    /// Fetches the remote model's signature, after checking it is ready.
    pub async fn metadata(&self, timeout: Duration) -> Result<Signature, RuntimeError> {
        let url = self.target.model_url();
        let ready = self
            .http
            .get(format!("{url}/ready"))
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| unavailable(&self.target, e))?;
        if !ready.status().is_success() {
            return Err(RuntimeError::Unavailable(format!(
                "remote model {url} is not ready (GET {url}/ready answered {})",
                ready.status()
            )));
        }
        let resp = self
            .http
            .get(&url)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| unavailable(&self.target, e))?;
        if !resp.status().is_success() {
            return Err(RuntimeError::Unavailable(format!(
                "remote model metadata GET {url} answered {}",
                resp.status()
            )));
        }
        let meta: RemoteMetadata = resp.json().await.map_err(|e| {
            RuntimeError::UnsupportedSignature(format!(
                "remote model metadata at {url} is not V2 metadata: {e}"
            ))
        })?;
        let convert = |specs: Vec<RemoteSpec>,
                       role: &str|
         -> Result<Vec<TensorSpec>, RuntimeError> {
            specs
                .into_iter()
                .map(|s| {
                    let datatype = DataType::parse(&s.datatype).ok_or_else(|| {
                        RuntimeError::UnsupportedSignature(format!(
                            "remote {role} \"{}\" has datatype {}; Ferry serves BOOL, integer and floating-point tensors",
                            s.name, s.datatype
                        ))
                    })?;
                    Ok(TensorSpec { name: s.name, datatype, shape: s.shape })
                })
                .collect()
        };
        Ok(Signature {
            inputs: convert(meta.inputs, "input")?,
            outputs: convert(meta.outputs, "output")?,
        })
    }

    /// Sends one request as JSON and decodes the outputs. Connection failures
    /// and 5xx answers are `Unavailable`/`Inference` (retryable elsewhere);
    /// 4xx answers are `BadInput`.
    pub async fn infer(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
        let body = protocol::encode_request_json(None, inputs);
        let (bytes, header_len) = self.forward(body.into(), None).await?;
        protocol::decode_response_json(&bytes, header_len.as_deref()).map_err(|e| {
            RuntimeError::Inference(format!(
                "remote {} sent an unreadable answer: {e}",
                self.target.display()
            ))
        })
    }

    /// Sends a request body as it is (JSON, or the binary extension when
    /// `header_len` is set) and returns the answer's body and its
    /// `Inference-Header-Content-Length`. Error answers become errors.
    pub async fn forward(
        &self,
        body: bytes::Bytes,
        header_len: Option<&str>,
    ) -> Result<(bytes::Bytes, Option<String>), RuntimeError> {
        let mut rb = self.http.post(self.infer_url.clone()).body(body);
        rb = match header_len {
            Some(n) => rb
                .header("content-type", "application/octet-stream")
                .header(protocol::HEADER_CONTENT_LENGTH, n),
            None => rb.header("content-type", "application/json"),
        };
        let resp = rb.send().await.map_err(|e| unavailable(&self.target, e))?;
        let status = resp.status();
        let header_len = resp
            .headers()
            .get(protocol::HEADER_CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| unavailable(&self.target, e))?;
        if !status.is_success() {
            let msg = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(200).collect());
            let text = format!("remote {} answered {status}: {msg}", self.target.display());
            return Err(
                if status.is_client_error() && status != StatusCode::TOO_MANY_REQUESTS {
                    RuntimeError::BadInput(text)
                } else {
                    RuntimeError::Upstream(text)
                },
            );
        }
        Ok((bytes, header_len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_url_forms() {
        let t = RemoteTarget::parse("http://127.0.0.1:9000", "cancer").unwrap();
        assert_eq!(t.model_url(), "http://127.0.0.1:9000/v2/models/cancer");
        let t = RemoteTarget::parse("http://h:1/v2/models/other", "cancer").unwrap();
        assert_eq!((t.model.as_str(), t.version.as_deref()), ("other", None));
        let t = RemoteTarget::parse("http://h:1/v2/models/other/versions/3/", "cancer").unwrap();
        assert_eq!(t.model_url(), "http://h:1/v2/models/other/versions/3");
        assert!(
            RemoteTarget::parse("http://h:1/predict", "m")
                .unwrap_err()
                .contains("/v2/models/NAME")
        );
        assert!(
            RemoteTarget::parse("https://h:1", "m")
                .unwrap_err()
                .contains("only http://")
        );
        assert!(RemoteTarget::parse("not a url", "m").is_err());
    }
}
