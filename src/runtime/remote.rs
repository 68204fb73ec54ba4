//! Clients of remote Open Inference Protocol servers (Triton, MLServer, KServe,
//! another Ferry): one [`RemoteClient`] per endpoint, sharing [`RemoteHttp`]:
//! reqwest for the occasional metadata and readiness calls, and hyper's pooled
//! keep-alive client directly for inference, the per-request path (reqwest's
//! URL, proxy, redirect and retry layers cost more than the request itself
//! on a pass-through; BENCHMARKS.md).

use std::time::Duration;

use hyper::StatusCode;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use reqwest::Url;
use serde::Deserialize;

use super::RuntimeError;
use crate::protocol::{self, DataType, Tensor};
use crate::protocol::{Signature, TensorSpec};

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
    infer_uri: hyper::Uri,
    http: RemoteHttp,
}

type DataClient =
    hyper_util::client::legacy::Client<HttpConnector, http_body_util::Full<bytes::Bytes>>;

/// The HTTP clients every remote replica shares, each with its pool of
/// keep-alive connections: `control` (reqwest) for metadata, readiness and
/// the controller's webhooks and queries; `data` (hyper) for inference.
#[derive(Clone)]
pub struct RemoteHttp {
    pub control: reqwest::Client,
    data: std::sync::Arc<DataClient>,
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

impl RemoteHttp {
    /// The clients every remote replica shares: connections are kept alive
    /// for 90 s idle, opened with `TCP_NODELAY` within `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> RemoteHttp {
        let idle = Duration::from_secs(90);
        // No redirects: a webhook or remote that answers 3xx gets that
        // answer, and cannot send Ferry to a host --allow-outbound refuses.
        let control = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(connect_timeout)
            .pool_idle_timeout(idle)
            .tcp_nodelay(true)
            .build()
            .expect("the HTTP client builds with static settings");
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let data = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(idle)
            .pool_timer(TokioTimer::new())
            .build(connector);
        RemoteHttp {
            control,
            data: std::sync::Arc::new(data),
        }
    }
}

/// A failed call, named by its root cause: the clients' own texts ("error
/// sending request for url ...", "client error (Connect)") hide what a
/// reader needs — refused, reset, closed early.
fn unavailable(
    target: &RemoteTarget,
    e: &(dyn std::error::Error + 'static),
    timeout: bool,
    connect: bool,
) -> RuntimeError {
    let mut cause = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        cause = inner.to_string();
        source = inner.source();
    }
    let why = if timeout {
        "timed out".to_string()
    } else if connect {
        format!("connection failed ({cause})")
    } else {
        format!("request failed ({cause})")
    };
    RuntimeError::Unavailable(format!("remote {} {why}", target.display()))
}

fn control_unavailable(target: &RemoteTarget, e: reqwest::Error) -> RuntimeError {
    unavailable(target, &e, e.is_timeout(), e.is_connect())
}

impl RemoteClient {
    pub fn new(target: RemoteTarget, http: RemoteHttp) -> RemoteClient {
        // Url percent-encodes what a URI may not hold; its text is a URI.
        let infer_uri = Url::parse(&format!("{}/infer", target.model_url()))
            .ok()
            .and_then(|url| url.as_str().parse().ok())
            .expect("a remote target is a valid http URL (checked when it was parsed)");
        RemoteClient {
            target,
            infer_uri,
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
            .control
            .get(format!("{url}/ready"))
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| control_unavailable(&self.target, e))?;
        if !ready.status().is_success() {
            return Err(RuntimeError::Unavailable(format!(
                "remote model {url} is not ready (GET {url}/ready answered {})",
                ready.status()
            )));
        }
        let resp = self
            .http
            .control
            .get(&url)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| control_unavailable(&self.target, e))?;
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
        let content_type = match header_len {
            Some(_) => "application/octet-stream",
            None => "application/json",
        };
        let mut request = hyper::Request::post(self.infer_uri.clone())
            .header(hyper::header::CONTENT_TYPE, content_type);
        if let Some(n) = header_len {
            request = request.header(protocol::HEADER_CONTENT_LENGTH, n);
        }
        let request = request
            .body(http_body_util::Full::new(body))
            .map_err(|e| RuntimeError::BadInput(format!("cannot forward the request: {e}")))?;
        let resp = self
            .http
            .data
            .request(request)
            .await
            .map_err(|e| unavailable(&self.target, &e, false, e.is_connect()))?;
        let status = resp.status();
        let header_len = resp
            .headers()
            .get(protocol::HEADER_CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map_err(|e| unavailable(&self.target, &e, false, false))?
            .to_bytes();
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
