//! A replica's worker: one thread that owns one ONNX Runtime session and takes
//! jobs from a bounded queue. The async side only awaits the answer, so
//! inference never runs on the async threads; a full queue is an immediate
//! `QueueFull` (503 with `Retry-After`), never an unbounded wait.
//!
//! With adaptive batching on, the worker waits up to the batch delay after a
//! request for others to arrive and runs them as one batch ([`batch`]).
//!
//! Dropping every handle to a worker closes its queue: the thread finishes the
//! jobs already queued (the drain), then drops the session and exits.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::oneshot;

use super::onnx::OnnxSession;
use super::{RuntimeError, batch};
use crate::protocol::Tensor;

type Reply = oneshot::Sender<Result<Vec<Tensor>, RuntimeError>>;

struct Job {
    inputs: Vec<Tensor>,
    reply: Reply,
}

/// Adaptive batching settings of a worker.
#[derive(Clone)]
pub struct Batching {
    /// Most requests merged into one run.
    pub max: usize,
    /// How long the first request waits for others.
    pub delay: Duration,
    /// Observes each run's number of requests.
    pub sizes: Option<Histogram>,
}

/// Handle to a worker thread.
pub struct Worker {
    queue: SyncSender<Job>,
    depth: usize,
}

/// Runs jobs one by one.
fn run_each(session: &mut OnnxSession, jobs: Vec<Job>) {
    for job in jobs {
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| session.run(job.inputs)))
            .unwrap_or_else(|_| Err(RuntimeError::Inference("the engine panicked".into())));
        let _ = job.reply.send(result);
    }
}

/// Runs jobs as one batch when their inputs can be merged and the outputs
/// split back; otherwise (or when the batch fails) one by one.
fn run_batch(session: &mut OnnxSession, jobs: Vec<Job>) {
    if jobs.len() < 2 {
        return run_each(session, jobs);
    }
    let inputs: Vec<Vec<Tensor>> = jobs.iter().map(|j| j.inputs.clone()).collect();
    let Some((merged, rows)) = batch::merge(&inputs) else {
        return run_each(session, jobs);
    };
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| session.run(merged)));
    match result
        .ok()
        .and_then(Result::ok)
        .and_then(|out| batch::split(out, &rows))
    {
        Some(parts) => {
            for (job, outputs) in jobs.into_iter().zip(parts) {
                let _ = job.reply.send(Ok(outputs));
            }
        }
        None => run_each(session, jobs),
    }
}

impl Worker {
    /// Starts the thread. `depth` is the number of requests that may wait;
    /// with `batching`, requests that arrive within its delay of each other
    /// run together.
    pub fn spawn(
        name: &str,
        mut session: OnnxSession,
        depth: usize,
        batching: Option<Batching>,
    ) -> std::io::Result<Worker> {
        let depth = depth.max(1);
        let (queue, jobs) = sync_channel::<Job>(depth);
        std::thread::Builder::new()
            .name(format!("ferry-{name}"))
            .spawn(move || {
                while let Ok(first) = jobs.recv() {
                    let mut batch = vec![first];
                    if let Some(b) = &batching {
                        let deadline = Instant::now() + b.delay;
                        while batch.len() < b.max {
                            let left = deadline.saturating_duration_since(Instant::now());
                            match jobs.recv_timeout(left) {
                                Ok(job) => batch.push(job),
                                Err(_) => break,
                            }
                        }
                    }
                    // Skip the work of callers that gave up (timeout).
                    batch.retain(|j| !j.reply.is_closed());
                    if let Some(sizes) = batching.as_ref().and_then(|b| b.sizes.as_ref())
                        && !batch.is_empty()
                    {
                        sizes.observe(batch.len() as f64);
                    }
                    run_batch(&mut session, batch);
                }
            })?;
        Ok(Worker { queue, depth })
    }
    pub async fn infer(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
        let (reply, answer) = oneshot::channel();
        match self.queue.try_send(Job { inputs, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(RuntimeError::QueueFull { depth: self.depth });
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(RuntimeError::Unavailable("the replica has stopped".into()));
            }
        }
        answer
            .await
            .map_err(|_| RuntimeError::Unavailable("the replica stopped before answering".into()))?
    }
}
