//! Turning an artifact into something that runs: ONNX Runtime sessions on their
//! own worker threads, and clients of remote Open Inference Protocol servers.
//!
//! Layout: [`library`] finds and loads `libonnxruntime`; [`signature`] is a
//! model's input/output contract; [`inspect`] refuses models that read data
//! from outside their file; [`onnx`] builds sessions and runs them;
//! [`worker`] gives each session a thread and a bounded queue; [`remote`]
//! speaks V2 to another server, over REST or ([`grpc_remote`]) gRPC. [`Engine`] is what the gateway calls: it does
//! not know about versions, routes or rollouts.

pub mod batch;
pub mod grpc_remote;
pub mod inspect;
pub mod library;
pub mod onnx;
pub mod remote;
pub mod target;
pub mod upstream;
pub mod worker;

use std::time::Duration;

use crate::protocol::Tensor;
pub use crate::protocol::{Signature, TensorSpec};
pub use onnx::OnnxRuntime;
pub use remote::{RemoteClient, RemoteTarget};
pub use worker::{Batching, Worker};

/// What can go wrong turning an artifact into answers.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No `libonnxruntime` anywhere Ferry looks.
    #[error(
        "ONNX Runtime library not found (looked in: {tried}). Fix: run `cargo build` in a Ferry checkout \
         (it provisions the library beside the binary), or `python3 scripts/fetch-onnxruntime.py DIR` and \
         start with `--ort-library DIR/libonnxruntime.so`, or set ORT_DYLIB_PATH"
    )]
    LibraryNotFound { tried: String },
    /// The library exists but could not be loaded.
    #[error("could not load ONNX Runtime from {path}: {reason}")]
    LibraryLoad { path: String, reason: String },
    /// The artifact is not a model ONNX Runtime can load.
    #[error("not a loadable ONNX model: {0}")]
    InvalidModel(String),
    /// The model is one Ferry will not load: it reads data from outside its
    /// file, or declares inputs no request could carry.
    #[error("{0}")]
    Refused(String),
    /// The model loads but its inputs or outputs are not something Ferry can serve.
    #[error("{0}")]
    UnsupportedSignature(String),
    /// The input does not fit the model's signature (a client error).
    #[error("{0}")]
    BadInput(String),
    /// The engine failed while running (a server-side error).
    #[error("inference failed: {0}")]
    Inference(String),
    /// A remote endpoint answered with a server error.
    #[error("{0}")]
    Upstream(String),
    /// The replica's queue is full; the client should retry shortly.
    #[error("replica queue is full ({depth} requests waiting); retry shortly")]
    QueueFull { depth: usize },
    /// No answer within the version's timeout.
    #[error("no answer within the timeout of {0:?}")]
    Timeout(Duration),
    /// A run (a warm-up) did not finish within its deadline and was stopped.
    #[error(
        "the warm-up inference did not finish within the load timeout of {}; ONNX Runtime was told to stop it \
         and the model was not loaded (a model whose run takes longer needs a longer `ferry serve --load-timeout`)",
        crate::units::HumanDuration(*.0)
    )]
    Deadline(Duration),
    /// The replica cannot take requests (stopped, or a remote that does not answer).
    #[error("{0}")]
    Unavailable(String),
}

impl RuntimeError {
    /// Whether retrying the same request on another version may help: true for
    /// failures of the serving side, false when the input itself is wrong.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, RuntimeError::BadInput(_))
    }
}

/// Bounds on loading a model, whoever declared it (an ONNX file or a
/// remote server's metadata): `ferry serve --max-body-bytes` and
/// `--load-timeout`.
#[derive(Debug, Clone, Copy)]
pub struct LoadLimits {
    /// Most bytes a warm-up's inputs may take: the request body limit, since
    /// a model whose smallest request is larger could never be served.
    pub max_input_bytes: u64,
    /// How long a warm-up inference may run before it is stopped.
    pub timeout: Duration,
}

impl Default for LoadLimits {
    fn default() -> Self {
        LoadLimits {
            max_input_bytes: 64 << 20,
            timeout: Duration::from_secs(60),
        }
    }
}

/// A remote's answer to a body passed through as it came.
#[derive(Debug)]
pub struct Passed {
    pub body: bytes::Bytes,
    /// Its `Inference-Header-Content-Length` (binary extension).
    pub header_len: Option<String>,
    /// How long the remote took, from the request (its connection
    /// included) to the arrival in the kernel of the answer's last bytes
    /// ([`upstream::Answer::took`]): without the time the calling thread
    /// then waited for the CPU. `None` over TLS, or without timestamps.
    pub took: Option<Duration>,
}

/// One running replica's engine: the only thing the gateway calls to infer.
pub enum Engine {
    /// An ONNX Runtime session on its own thread.
    Local(Worker),
    /// An endpoint of a remote V2 server.
    Remote(RemoteClient),
}

impl Engine {
    /// A remote endpoint that takes V2 REST bodies as they are (an HTTP
    /// remote: pass-through and body copies; a gRPC remote takes tensors).
    pub fn is_remote(&self) -> bool {
        matches!(self, Engine::Remote(r) if r.takes_bodies())
    }

    /// Passes a request body through to a remote endpoint untouched, with
    /// the request's id beside it.
    pub async fn forward(
        &self,
        body: bytes::Bytes,
        header_len: Option<&str>,
        id: Option<&str>,
    ) -> Result<Passed, RuntimeError> {
        match self {
            Engine::Remote(r) => r.forward(body, header_len, id).await,
            Engine::Local(_) => Err(RuntimeError::Inference(
                "a local replica has no pass-through".into(),
            )),
        }
    }

    /// Runs one request. Inputs must already match the version's signature.
    pub async fn infer(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
        match self {
            Engine::Local(w) => w.infer(inputs).await,
            Engine::Remote(r) => r.infer(&inputs).await,
        }
    }

    /// [`Engine::infer`], with how long the answer took to be ready when
    /// the engine can tell it apart from the caller's own wait to notice
    /// it: a worker thread's run, or a remote's answer on a thread that
    /// times answers. For the shadow copies' low-priority threads, whose
    /// wait for the CPU is not the version's latency.
    /// A remote is sent the request's `id`; an in-process run has no use
    /// for it.
    pub async fn infer_timed(
        &self,
        inputs: Vec<Tensor>,
        id: Option<&str>,
    ) -> Result<(Vec<Tensor>, Option<Duration>), RuntimeError> {
        match self {
            Engine::Local(w) => w.infer_timed(inputs).await,
            Engine::Remote(r) => r.infer_timed(&inputs, id).await,
        }
    }
}
