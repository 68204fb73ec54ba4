//! A fake remote V2 server with the example models' signature, built by the
//! tests: it answers slowly, or with errors, or not at all (shut down), so
//! the gateway's failover and mirroring can be tested against real sockets.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde_json::{Value, json};

#[derive(Default)]
pub struct Behaviour {
    /// Milliseconds to wait before answering an inference.
    pub delay_ms: AtomicU64,
    /// Answer inferences with 500.
    pub failing: AtomicBool,
    /// Answer inferences with 200 and a body that is not JSON.
    pub garbled: AtomicBool,
    /// Answer inferences with 200 and `"outputs": []`.
    pub no_outputs: AtomicBool,
    /// Answer without the request's id (`Some(None)`), or with this id
    /// instead (`Some(Some(id))`); echo it when `None`.
    pub answer_id: std::sync::Mutex<Option<Option<String>>>,
    /// Inference requests received.
    pub received: AtomicU64,
    /// Answer class 0 (with probability 0.8) instead of class 1.
    pub class_zero: AtomicBool,
    /// The body of the last inference request, byte for byte.
    pub last_body: std::sync::Mutex<Vec<u8>>,
    /// The last inference request's `x-ferry-request-id`.
    pub last_request_id: std::sync::Mutex<Option<String>>,
    /// Requests without this header and value get 401.
    pub required_header: std::sync::Mutex<Option<(String, String)>>,
}

async fn check_header(
    State(b): State<Arc<Behaviour>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let required = b.required_header.lock().unwrap().clone();
    if let Some((name, value)) = required
        && req.headers().get(&name).and_then(|v| v.to_str().ok()) != Some(value.as_str())
    {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": format!("header {name} missing or wrong")})),
        )
            .into_response();
    }
    next.run(req).await
}

pub struct Upstream {
    pub url: String,
    pub behaviour: Arc<Behaviour>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

fn signature() -> Value {
    json!({
        "name": "cancer", "versions": ["1"], "platform": "fake",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}],
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}]
    })
}

async fn infer(
    State(b): State<Arc<Behaviour>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    *b.last_body.lock().unwrap() = body.to_vec();
    *b.last_request_id.lock().unwrap() = headers
        .get("x-ferry-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    b.received.fetch_add(1, Ordering::Relaxed);
    let delay = b.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if b.failing.load(Ordering::Relaxed) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({"error": "fake upstream failure"})),
        )
            .into_response();
    }
    if b.garbled.load(Ordering::Relaxed) {
        return (
            StatusCode::OK,
            [("content-type", "application/json")],
            "{\"outputs\": [",
        )
            .into_response();
    }
    if b.no_outputs.load(Ordering::Relaxed) {
        return axum::Json(json!({"model_name": "cancer", "outputs": []})).into_response();
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let rows = req["inputs"][0]["shape"][0].as_u64().unwrap_or(1) as usize;
    // Class 1 with probability 0.8 (or class 0, when told so).
    let zero = b.class_zero.load(Ordering::Relaxed);
    let (label, probabilities) = match zero {
        false => (1, [0.2, 0.8].repeat(rows)),
        true => (0, [0.8, 0.2].repeat(rows)),
    };
    // Like real V2 servers, the answer carries the request's id.
    let mut answer = json!({
        "model_name": "cancer", "model_version": "1",
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [rows], "data": vec![label; rows]},
            {"name": "probabilities", "datatype": "FP32", "shape": [rows, 2], "data": probabilities}
        ]
    });
    match b.answer_id.lock().unwrap().clone() {
        None => {
            if let Some(id) = req.get("id") {
                answer["id"] = id.clone();
            }
        }
        Some(Some(own)) => answer["id"] = json!(own),
        Some(None) => {}
    }
    (StatusCode::OK, axum::Json(answer)).into_response()
}

impl Behaviour {
    /// The `x-ferry-request-id` of the last inference request.
    pub fn last_request_id(&self) -> Option<String> {
        self.last_request_id.lock().unwrap().clone()
    }
}

impl Upstream {
    /// The fake's routes, answering as `behaviour` says.
    pub fn app(behaviour: Arc<Behaviour>) -> Router {
        Router::new()
            .route(
                "/v2/models/cancer",
                get(|| async { axum::Json(signature()) }),
            )
            .route(
                "/v2/models/cancer/ready",
                get(|| async { axum::Json(json!({"ready": true})) }),
            )
            .route("/v2/models/cancer/infer", post(infer))
            .layer(axum::middleware::from_fn_with_state(
                behaviour.clone(),
                check_header,
            ))
            .with_state(behaviour)
    }

    /// The fake over HTTPS with the test server certificate (`tls/`), at
    /// `https://localhost:PORT`; with `client_ca`, clients must present a
    /// certificate that CA signed (mutual TLS).
    pub async fn start_tls(client_ca: Option<&std::path::Path>) -> Upstream {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        use tokio_rustls::rustls;
        let data = super::harness::test_data;
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(data("tls/server.pem"))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_file(data("tls/server.key")).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(ca).unwrap() {
                    roots.add(c.unwrap()).unwrap();
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_single_cert(chain, key).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let behaviour = Arc::new(Behaviour::default());
        let app = Upstream::app(behaviour.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://localhost:{}",
            listener.local_addr().unwrap().port()
        );
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    accepted = listener.accept() => accepted.unwrap(),
                    _ = &mut rx => return,
                };
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    // A client without a good certificate fails here.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Upstream {
            url,
            behaviour,
            shutdown: Some(tx),
        }
    }

    /// From now on, requests must carry this header with this value.
    pub fn require_header(&self, name: &str, value: &str) {
        *self.behaviour.required_header.lock().unwrap() = Some((name.into(), value.into()));
    }

    pub async fn start() -> Upstream {
        let behaviour = Arc::new(Behaviour::default());
        let app = Upstream::app(behaviour.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Upstream {
            url,
            behaviour,
            shutdown: Some(tx),
        }
    }

    pub fn set_delay(&self, ms: u64) {
        self.behaviour.delay_ms.store(ms, Ordering::Relaxed);
    }

    pub fn set_failing(&self, failing: bool) {
        self.behaviour.failing.store(failing, Ordering::Relaxed);
    }

    pub fn answer_class_zero(&self) {
        self.behaviour.class_zero.store(true, Ordering::Relaxed);
    }

    pub fn last_body(&self) -> Vec<u8> {
        self.behaviour.last_body.lock().unwrap().clone()
    }

    pub fn received(&self) -> u64 {
        self.behaviour.received.load(Ordering::Relaxed)
    }

    /// Stops listening: new connections are refused from now on.
    pub fn shut_down(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
