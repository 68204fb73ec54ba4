//! A replica's worker: one thread that owns one ONNX Runtime session and takes
//! jobs from a bounded queue. The async side only awaits the answer, so
//! inference never runs on the async threads; a full queue is an immediate
//! `QueueFull` (503 with `Retry-After`), never an unbounded wait.
//!
//! Dropping every handle to a worker closes its queue: the thread finishes the
//! jobs already queued (the drain), then drops the session and exits.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

use tokio::sync::oneshot;

use super::RuntimeError;
use super::onnx::OnnxSession;
use crate::protocol::Tensor;

type Reply = oneshot::Sender<Result<Vec<Tensor>, RuntimeError>>;

struct Job {
    inputs: Vec<Tensor>,
    reply: Reply,
}

/// Handle to a worker thread.
pub struct Worker {
    queue: SyncSender<Job>,
    depth: usize,
}

impl Worker {
    /// Starts the thread. `depth` is the number of requests that may wait.
    pub fn spawn(name: &str, mut session: OnnxSession, depth: usize) -> std::io::Result<Worker> {
        let depth = depth.max(1);
        let (queue, jobs) = sync_channel::<Job>(depth);
        std::thread::Builder::new()
            .name(format!("ferry-{name}"))
            .spawn(move || {
                while let Ok(job) = jobs.recv() {
                    if job.reply.is_closed() {
                        continue; // the caller gave up (timeout): skip the work
                    }
                    let result =
                        std::panic::catch_unwind(AssertUnwindSafe(|| session.run(job.inputs)))
                            .unwrap_or_else(|_| {
                                Err(RuntimeError::Inference("the engine panicked".into()))
                            });
                    let _ = job.reply.send(result);
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
