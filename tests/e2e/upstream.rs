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
    /// Inference requests received.
    pub received: AtomicU64,
    /// Answer class 0 (with probability 0.8) instead of class 1.
    pub class_zero: AtomicBool,
    /// The body of the last inference request, byte for byte.
    pub last_body: std::sync::Mutex<Vec<u8>>,
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

async fn infer(State(b): State<Arc<Behaviour>>, body: axum::body::Bytes) -> impl IntoResponse {
    *b.last_body.lock().unwrap() = body.to_vec();
    b.received.fetch_add(1, Ordering::Relaxed);
    let delay = b.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if b.failing.load(Ordering::Relaxed) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({"error": "fake upstream failure"})),
        );
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
    if let Some(id) = req.get("id") {
        answer["id"] = id.clone();
    }
    (StatusCode::OK, axum::Json(answer))
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
            .with_state(behaviour)
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
