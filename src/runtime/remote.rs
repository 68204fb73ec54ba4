//! Clients of remote Open Inference Protocol servers (Triton, MLServer, KServe,
//! another Ferry): one [`RemoteClient`] per endpoint, sharing [`RemoteHttp`]:
//! reqwest for the occasional metadata and readiness calls, and for
//! inference, the per-request path, a lean HTTP/1.1 client of our own on
//! plain `http://` endpoints ([`super::upstream`]) and hyper's pooled client
//! on `https://` ones (reqwest's URL, proxy, redirect and retry layers cost
//! more than the request itself on a pass-through; BENCHMARKS.md).
//!
//! Both inference clients keep their connections per thread: a serving
//! thread (`server`'s thread per core) sends its requests on its own
//! keep-alive connections, so a pass-through request never wakes another
//! thread (BENCHMARKS.md, the gateway's profile).
//!
//! A version on `https://` endpoints, or with request headers, gets its own
//! pair of clients ([`RemoteHttp::client`]) built from its
//! [`RemoteAccess`]: rustls with the system CAs or a given CA, an optional
//! client certificate (mutual TLS), and headers whose values are read from
//! the server's environment or disk when the version starts — only the
//! references (`@env:VAR`, `@file:PATH`) are stored or shown. Plain-HTTP
//! versions keep the shared clients.
//!
//! A `grpc://` endpoint is called over gRPC instead ([`super::grpc_remote`]),
//! behind the same [`RemoteClient`]: metadata, warm-up and inference take the
//! same calls, timeouts and failover rules; only pass-through (the REST body
//! as it is) needs an HTTP remote.

use std::time::Duration;

use std::sync::Arc;

use hyper::StatusCode;
use hyper::header::{HeaderMap, HeaderValue};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use reqwest::Url;
use serde::Deserialize;

use super::upstream::{FailureKind, Upstream};
use super::{Passed, RuntimeError};
use crate::protocol::Signature;
use crate::protocol::{self, Tensor};
use crate::records::{HeaderRef, RemoteAccess};

pub use super::target::RemoteTarget;
use super::target::signature_of;

/// Calls one remote endpoint.
pub struct RemoteClient {
    target: RemoteTarget,
    /// The control client and the headers every request carries.
    http: RemoteHttp,
    /// How inference goes, by the endpoint's scheme.
    transport: Transport,
}

/// A remote endpoint's inference client, one per scheme.
enum Transport {
    /// `http://`: our own keep-alive client.
    Plain(Box<Upstream>),
    /// `https://`: hyper's pooled client over rustls.
    Tls {
        /// Parsed once: parsing a URL on every request showed up in profiles.
        infer_uri: hyper::Uri,
        client: Arc<PerThread<HttpsConnector<HttpConnector>>>,
    },
    /// `grpc://`: the calls go over gRPC.
    Grpc(Box<super::grpc_remote::GrpcRemote>),
}

type Body = http_body_util::Full<bytes::Bytes>;

/// How long an upstream connection may stay idle in a pool.
const IDLE: Duration = Duration::from_secs(90);

/// hyper's pooled client, one per thread that sends requests: each thread
/// keeps its own keep-alive connections, and their connection tasks run on
/// the runtime of the thread that opened them, so no connection (and no
/// wake-up) is handed between threads.
struct PerThread<C: Send> {
    connector: C,
    clients: thread_local::ThreadLocal<hyper_util::client::legacy::Client<C, Body>>,
}

impl<C> PerThread<C>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    fn new(connector: C) -> PerThread<C> {
        PerThread {
            connector,
            clients: thread_local::ThreadLocal::new(),
        }
    }

    /// This thread's client (made on its first request).
    fn client(&self) -> &hyper_util::client::legacy::Client<C, Body> {
        self.clients.get_or(|| {
            hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .pool_idle_timeout(IDLE)
                .pool_timer(TokioTimer::new())
                .build(self.connector.clone())
        })
    }
}

/// The HTTP clients of remote replicas, each with its pool of keep-alive
/// connections: `control` (reqwest) for metadata, readiness and the
/// controller's webhooks and queries; for inference on `https://`, `tls`
/// (hyper over rustls; a plain endpoint gets its own [`Upstream`] in
/// [`RemoteHttp::client`]); and the headers every request to the remote
/// carries.
#[derive(Clone)]
pub struct RemoteHttp {
    pub control: reqwest::Client,
    tls: Option<Arc<PerThread<HttpsConnector<HttpConnector>>>>,
    headers: Arc<HeaderMap>,
    connect_timeout: Duration,
    /// The largest inference answer taken (`--max-body-bytes`).
    max_answer: usize,
}

/// Reading what a [`RemoteAccess`] refers to, when a version starts.
impl RemoteAccess {
    /// Reads the header values; an error names the reference, not a value.
    fn resolve_headers(&self) -> Result<HeaderMap, String> {
        let mut map = HeaderMap::new();
        for spec in &self.headers {
            let (name, from) = Self::header(spec)?;
            let value = match from {
                HeaderRef::Env(var) => std::env::var(var).map_err(|_| {
                    format!("remote header {name}: the server's environment has no variable {var}")
                })?,
                HeaderRef::File(path) => std::fs::read_to_string(path)
                    .map_err(|e| format!("remote header {name}: cannot read {path}: {e}"))?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
            };
            let mut value = HeaderValue::from_str(&value).map_err(|_| {
                format!(
                    "remote header {name}: the value read from {spec:?} is not a valid header value"
                )
            })?;
            value.set_sensitive(true);
            map.append(name, value);
        }
        Ok(map)
    }

    /// The rustls client configuration: the system CAs or `ca_cert`, and the
    /// client certificate when given.
    fn tls_config(&self) -> Result<tokio_rustls::rustls::ClientConfig, String> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        use tokio_rustls::rustls;
        let roots = match &self.ca_cert {
            Some(path) => pem_roots(std::path::Path::new(path), "remote CA certificate")?,
            None => system_roots().ok_or(
                "no system CA certificates were found; give the remote's CA with --remote-ca-cert",
            )?,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up: {e}"))?
            .with_root_certificates(roots);
        match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                    .and_then(|i| i.collect())
                    .map_err(|e| format!("remote client certificate {cert}: {e}"))?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("remote client key {key}: {e}"))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("remote client certificate {cert}: {e}"))
            }
            _ => Ok(builder.with_no_client_auth()),
        }
    }
}

/// The CA certificates of a PEM file, as rustls trusts them; an error names
/// the file as `what` (e.g. "remote CA certificate") and what is wrong.
pub fn pem_roots(
    path: &std::path::Path,
    what: &str,
) -> Result<tokio_rustls::rustls::RootCertStore, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let shown = path.display();
    let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect())
        .map_err(|e| format!("{what} {shown}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what} {shown} holds no PEM certificate"));
    }
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| format!("{what} {shown}: {e}"))?;
    }
    Ok(roots)
}

/// The system's CA certificates, or None when none were found.
pub fn system_roots() -> Option<tokio_rustls::rustls::RootCertStore> {
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    (!roots.is_empty()).then_some(roots)
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
    /// for 90 s idle, opened with `TCP_NODELAY` within `connect_timeout`;
    /// inference answers may be up to `max_answer` bytes.
    pub fn new(connect_timeout: Duration, max_answer: usize) -> RemoteHttp {
        // No redirects: a webhook or remote that answers 3xx gets that
        // answer, and cannot send Ferry to a host --allow-outbound refuses.
        let control = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(connect_timeout)
            .pool_idle_timeout(IDLE)
            .tcp_nodelay(true)
            .build()
            .expect("the HTTP client builds with static settings");
        RemoteHttp {
            control,
            tls: None,
            headers: Arc::new(HeaderMap::new()),
            connect_timeout,
            max_answer,
        }
    }

    /// The connector under rustls, which handles `https`.
    fn connector(connect_timeout: Duration) -> HttpConnector {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.enforce_http(false);
        connector
    }

    /// The client of one endpoint of a remote version, with what `access`
    /// says (TLS settings, headers, read now). Errors name the file or
    /// variable.
    pub fn client(
        &self,
        target: RemoteTarget,
        access: &RemoteAccess,
    ) -> Result<RemoteClient, String> {
        let http = self.for_version(access, target.is_https())?;
        Ok(RemoteClient::new(target, http))
    }

    /// The clients of one remote version: the shared ones for plain HTTP
    /// without headers; otherwise its own, with TLS (rustls) for `https`
    /// and the headers read now.
    fn for_version(&self, access: &RemoteAccess, https: bool) -> Result<RemoteHttp, String> {
        if !https && access.is_empty() {
            return Ok(self.clone());
        }
        access.validate()?;
        let headers = access.resolve_headers()?;
        let mut control = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(self.connect_timeout)
            .pool_idle_timeout(IDLE)
            .tcp_nodelay(true)
            .default_headers(headers.clone());
        let tls = if https {
            let tls = access.tls_config()?;
            control = control.use_preconfigured_tls(tls.clone());
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_http1()
                .wrap_connector(Self::connector(self.connect_timeout));
            Some(Arc::new(PerThread::new(connector)))
        } else {
            None
        };
        Ok(RemoteHttp {
            control: control
                .build()
                .map_err(|e| format!("the remote's HTTP client: {e}"))?,
            tls,
            headers: Arc::new(headers),
            connect_timeout: self.connect_timeout,
            max_answer: self.max_answer,
        })
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
    /// `http` is [`RemoteHttp::for_version`]'s for this target's scheme.
    fn new(target: RemoteTarget, http: RemoteHttp) -> RemoteClient {
        let transport = if target.is_grpc() {
            Transport::Grpc(Box::new(
                super::grpc_remote::GrpcRemote::new(&target, http.connect_timeout)
                    .expect("a grpc:// target is a valid address (checked when it was parsed)"),
            ))
        } else {
            // Url percent-encodes what a URI may not hold; its text is a URI.
            let infer_uri: hyper::Uri = Url::parse(&format!("{}/infer", target.model_url()))
                .ok()
                .and_then(|url| url.as_str().parse().ok())
                .expect("a remote target is a valid URL (checked when it was parsed)");
            match &http.tls {
                Some(client) => Transport::Tls {
                    infer_uri,
                    client: client.clone(),
                },
                None => {
                    let headers = http.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes()));
                    Transport::Plain(Box::new(Upstream::new(
                        &infer_uri,
                        headers,
                        http.connect_timeout,
                        IDLE,
                        http.max_answer,
                    )))
                }
            }
        };
        RemoteClient {
            target,
            http,
            transport,
        }
    }

    /// Whether a V2 REST body can be passed to this endpoint as it is (an
    /// HTTP remote); a gRPC remote takes decoded tensors.
    pub fn takes_bodies(&self) -> bool {
        !matches!(self.transport, Transport::Grpc(_))
    }

    pub fn target(&self) -> &RemoteTarget {
        &self.target
    }

    /// Fetches the remote model's signature, after checking it is ready.
    pub async fn metadata(&self, timeout: Duration) -> Result<Signature, RuntimeError> {
        if let Transport::Grpc(grpc) = &self.transport {
            return grpc
                .metadata(&self.target, &self.http.headers, timeout)
                .await;
        }
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
        let specs = |list: Vec<RemoteSpec>| {
            list.into_iter()
                .map(|s| (s.name, s.datatype, s.shape))
                .collect()
        };
        signature_of(specs(meta.inputs), specs(meta.outputs))
    }

    /// Sends one request as JSON and decodes the outputs. Connection failures
    /// and 5xx answers are `Unavailable`/`Inference` (retryable elsewhere);
    /// 4xx answers are `BadInput`.
    pub async fn infer(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
        self.infer_timed(inputs, None)
            .await
            .map(|(outputs, _)| outputs)
    }

    /// [`RemoteClient::infer`], with how long the remote took when this
    /// thread times answers ([`Passed::took`]).
    pub async fn infer_timed(
        &self,
        inputs: &[Tensor],
        id: Option<&str>,
    ) -> Result<(Vec<Tensor>, Option<Duration>), RuntimeError> {
        if let Transport::Grpc(grpc) = &self.transport {
            let outputs = grpc
                .infer(&self.target, &self.http.headers, inputs, id)
                .await?;
            return Ok((outputs, None));
        }
        let body = protocol::encode_request_json(id, inputs);
        let passed = self.forward(body.into(), None, id).await?;
        let outputs = protocol::decode_response_json(&passed.body, passed.header_len.as_deref())
            .map_err(|e| {
                RuntimeError::Inference(format!(
                    "remote {} sent an unreadable answer: {}",
                    self.target.display(),
                    e.of_answer()
                ))
            })?;
        Ok((outputs, passed.took))
    }

    /// Sends a request body as it is (JSON, or the binary extension when
    /// `header_len` is set) and returns the answer's body and its
    /// `Inference-Header-Content-Length`. Error answers become errors. The
    /// request's id, when it has one, goes with it as `x-ferry-request-id`.
    pub async fn forward(
        &self,
        body: bytes::Bytes,
        header_len: Option<&str>,
        id: Option<&str>,
    ) -> Result<Passed, RuntimeError> {
        let content_type = match header_len {
            Some(_) => "application/octet-stream",
            None => "application/json",
        };
        match &self.transport {
            Transport::Plain(upstream) => {
                self.forward_plain(upstream, content_type, body, header_len, id)
                    .await
            }
            Transport::Tls { infer_uri, client } => {
                self.forward_tls(infer_uri, client, content_type, body, header_len, id)
                    .await
            }
            Transport::Grpc(_) => Err(RuntimeError::Inference(format!(
                "remote {} speaks gRPC: it takes decoded tensors, not a REST body",
                self.target.display()
            ))),
        }
    }

    /// [`RemoteClient::forward`] to a plain-HTTP endpoint, on this
    /// thread's own keep-alive connections.
    async fn forward_plain(
        &self,
        upstream: &Upstream,
        content_type: &str,
        body: bytes::Bytes,
        header_len: Option<&str>,
        id: Option<&str>,
    ) -> Result<Passed, RuntimeError> {
        let header_len = header_len
            .map(|n| {
                n.trim().parse::<usize>().map_err(|_| {
                    RuntimeError::BadInput(format!(
                        "{}: {n:?} is not a length in bytes",
                        protocol::HEADER_CONTENT_LENGTH
                    ))
                })
            })
            .transpose()?;
        let answer = upstream
            .post(content_type, header_len, &body, id)
            .await
            .map_err(|f| {
                let target = self.target.display();
                match f.kind {
                    FailureKind::Connect => RuntimeError::Unavailable(format!(
                        "remote {target} connection failed ({})",
                        f.why
                    )),
                    FailureKind::Lost => RuntimeError::Unavailable(format!(
                        "remote {target} request failed ({})",
                        f.why
                    )),
                    FailureKind::BadAnswer => RuntimeError::Upstream(format!(
                        "remote {target} sent an answer Ferry cannot read: {}",
                        f.why
                    )),
                }
            })?;
        let status = StatusCode::from_u16(answer.status).map_err(|_| {
            RuntimeError::Upstream(format!(
                "remote {} answered with status {}, which HTTP does not have",
                self.target.display(),
                answer.status
            ))
        })?;
        let took = answer.took;
        let passed = self.answered(status, answer.body, answer.header_len)?;
        Ok(Passed { took, ..passed })
    }

    /// [`RemoteClient::forward`] to an `https://` endpoint, with hyper's
    /// pooled client over rustls.
    async fn forward_tls(
        &self,
        infer_uri: &hyper::Uri,
        tls: &PerThread<HttpsConnector<HttpConnector>>,
        content_type: &str,
        body: bytes::Bytes,
        header_len: Option<&str>,
        id: Option<&str>,
    ) -> Result<Passed, RuntimeError> {
        let mut request = hyper::Request::post(infer_uri.clone())
            .header(hyper::header::CONTENT_TYPE, content_type);
        if let Some(n) = header_len {
            request = request.header(protocol::HEADER_CONTENT_LENGTH, n);
        }
        if let Some(id) = id {
            request = request.header(protocol::REQUEST_ID_HEADER, id.trim());
        }
        let mut request = request
            .body(http_body_util::Full::new(body))
            .map_err(|e| RuntimeError::BadInput(format!("cannot forward the request: {e}")))?;
        if !self.http.headers.is_empty() {
            request.headers_mut().extend(
                self.http
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
        }
        let resp = tls
            .client()
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
        self.answered(status, bytes, header_len)
    }

    /// An answer's body and binary header length, or the error its status
    /// says (4xx but 429: the client's input; otherwise the remote's).
    fn answered(
        &self,
        status: StatusCode,
        bytes: bytes::Bytes,
        header_len: Option<String>,
    ) -> Result<Passed, RuntimeError> {
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
        Ok(Passed {
            body: bytes,
            header_len,
            took: None,
        })
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
        let t = RemoteTarget::parse("https://h:1/v2/models/other", "m").unwrap();
        assert_eq!(t.model_url(), "https://h:1/v2/models/other");
        assert!(t.is_https());
        assert!(
            RemoteTarget::parse("ftp://h:1", "m")
                .unwrap_err()
                .contains("http:// or https:// (grpc:// for a gRPC server)")
        );
        let t = RemoteTarget::parse("grpc://h:8001", "cancer").unwrap();
        assert_eq!(
            (t.model_url(), t.is_grpc()),
            ("grpc://h:8001/cancer".into(), true)
        );
        let t = RemoteTarget::parse("grpc://h:8001/other/3", "cancer").unwrap();
        assert_eq!(
            (t.model.as_str(), t.version.as_deref()),
            ("other", Some("3"))
        );
        assert_eq!(
            RemoteTarget::parse(&t.display(), "x").unwrap(),
            t,
            "the stored form parses back"
        );
        assert!(
            RemoteTarget::parse("grpc://h:1/a/b/c", "m")
                .unwrap_err()
                .contains("/MODEL[/VERSION]")
        );
        assert!(RemoteTarget::parse("not a url", "m").is_err());
    }
}
