//! A replica's worker: one thread that owns one ONNX Runtime session and takes
//! jobs from a bounded queue. The async side only awaits the answer, so
//! inference does not run on the async threads; a full queue is an immediate
//! `QueueFull` (503 with `Retry-After`), never an unbounded wait.
//!
//! The one exception is a model whose runs are tiny: when its recent runs
//! took under [`INLINE_BELOW`] and the replica is idle (nothing queued, the
//! session free), a request runs at once on the calling thread, sparing
//! the two thread wake-ups of handing it to the worker thread and back.
//! Batching replicas never run inline: their point is to wait for others.
//!
//! With adaptive batching on, the worker waits up to the batch delay after a
//! request for others to arrive and runs them as one batch ([`batch`]).
//!
//! Dropping every handle to a worker closes its queue: the thread finishes the
//! jobs already queued (the drain), then drops the session and exits.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};

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

/// Runs shorter than this (recently) may run on the calling thread: about
/// the longest a task should run between awaits without stalling the
/// others on its thread. The small scikit-learn models took 30–60 µs per
/// run at 200 req/s (p50 44 µs); the hand-off they skip cost 16–20 µs of
/// CPU and 0.02 ms of p50 latency per request (BENCHMARKS.md, serving).
pub const INLINE_BELOW: Duration = Duration::from_micros(100);

/// Handle to a worker thread.
pub struct Worker {
    queue: SyncSender<Job>,
    depth: usize,
    shared: Arc<Shared>,
}

/// What the worker thread and the callers share.
struct Shared {
    session: Mutex<OnnxSession>,
    pace: Pace,
}

impl Shared {
    /// Runs one request, timing it.
    fn run(
        &self,
        session: &mut OnnxSession,
        inputs: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, RuntimeError> {
        let started = Instant::now();
        let result = guarded(session, inputs);
        self.pace.ran(started.elapsed());
        result
    }
}

/// One session run; a panic in the engine becomes an error for this request.
fn guarded(session: &mut OnnxSession, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
    std::panic::catch_unwind(AssertUnwindSafe(|| session.run(inputs)))
        .unwrap_or_else(|_| Err(RuntimeError::Inference("the engine panicked".into())))
}

/// Whether a request may run inline: how long recent runs took, and how
/// many jobs wait for the thread. Pure bookkeeping, tested on its own.
struct Pace {
    /// Jobs sent and not yet taken by the thread.
    queued: AtomicUsize,
    /// A moving average of single runs, in nanoseconds (`u64::MAX`: none yet).
    run_nanos: AtomicU64,
    /// Whether requests may run inline at all (not when batching).
    inline: bool,
}

impl Pace {
    fn new(inline: bool) -> Pace {
        Pace {
            queued: AtomicUsize::new(0),
            run_nanos: AtomicU64::new(u64::MAX),
            inline,
        }
    }

    /// Records a single run's time. Clipped, so one run that was preempted
    /// does not stop inline runs for long; a model that is really slow
    /// still averages above the limit.
    fn ran(&self, took: Duration) {
        let took = took.min(2 * INLINE_BELOW).as_nanos() as u64;
        let average = match self.run_nanos.load(Ordering::Relaxed) {
            u64::MAX => took,
            before => before - before / 8 + took / 8,
        };
        self.run_nanos.store(average, Ordering::Relaxed);
    }

    /// Whether a request may run inline now: tiny recent runs, nothing queued.
    fn may_run_inline(&self) -> bool {
        self.inline
            && self.run_nanos.load(Ordering::Relaxed) < INLINE_BELOW.as_nanos() as u64
            && self.queued.load(Ordering::Acquire) == 0
    }

    fn sent(&self) {
        self.queued.fetch_add(1, Ordering::AcqRel);
    }

    /// A job the thread took, or one that could not be sent.
    fn taken(&self) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs jobs one by one.
fn run_each(shared: &Shared, session: &mut OnnxSession, jobs: Vec<Job>) {
    for job in jobs {
        let _ = job.reply.send(shared.run(session, job.inputs));
    }
}

/// Runs jobs as one batch when their inputs can be merged and the outputs
/// split back; otherwise (or when the batch fails) one by one.
fn run_batch(shared: &Shared, session: &mut OnnxSession, jobs: Vec<Job>) {
    if jobs.len() < 2 {
        return run_each(shared, session, jobs);
    }
    let inputs: Vec<Vec<Tensor>> = jobs.iter().map(|j| j.inputs.clone()).collect();
    let Some((merged, rows)) = batch::merge(&inputs) else {
        return run_each(shared, session, jobs);
    };
    match guarded(session, merged)
        .ok()
        .and_then(|out| batch::split(out, &rows))
    {
        Some(parts) => {
            for (job, outputs) in jobs.into_iter().zip(parts) {
                let _ = job.reply.send(Ok(outputs));
            }
        }
        None => run_each(shared, session, jobs),
    }
}

impl Worker {
    /// Starts the thread. `depth` is the number of requests that may wait;
    /// with `batching`, requests that arrive within its delay of each other
    /// run together.
    pub fn spawn(
        name: &str,
        session: OnnxSession,
        depth: usize,
        batching: Option<Batching>,
    ) -> std::io::Result<Worker> {
        let depth = depth.max(1);
        let (queue, jobs) = sync_channel::<Job>(depth);
        let shared = Arc::new(Shared {
            session: Mutex::new(session),
            pace: Pace::new(batching.is_none()),
        });
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("ferry-{name}"))
            .spawn(move || {
                let shared = thread_shared;
                let take = |job: Job| {
                    shared.pace.taken();
                    job
                };
                while let Ok(first) = jobs.recv() {
                    let mut batch = vec![take(first)];
                    if let Some(b) = &batching {
                        let deadline = Instant::now() + b.delay;
                        while batch.len() < b.max {
                            let left = deadline.saturating_duration_since(Instant::now());
                            match jobs.recv_timeout(left) {
                                Ok(job) => batch.push(take(job)),
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
                    let mut session = shared
                        .session
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    run_batch(&shared, &mut session, batch);
                }
            })?;
        Ok(Worker {
            queue,
            depth,
            shared,
        })
    }

    /// Runs a request: inline when the model's runs are tiny and the replica
    /// is idle, otherwise on the worker thread (see the module's doc).
    pub async fn infer(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
        if self.shared.pace.may_run_inline()
            && let Ok(mut session) = self.shared.session.try_lock()
        {
            return self.shared.run(&mut session, inputs);
        }
        let (reply, answer) = oneshot::channel();
        self.shared.pace.sent();
        match self.queue.try_send(Job { inputs, reply }) {
            Ok(()) => {}
            Err(e) => {
                self.shared.pace.taken();
                return Err(match e {
                    TrySendError::Full(_) => RuntimeError::QueueFull { depth: self.depth },
                    TrySendError::Disconnected(_) => {
                        RuntimeError::Unavailable("the replica has stopped".into())
                    }
                });
            }
        }
        answer
            .await
            .map_err(|_| RuntimeError::Unavailable("the replica stopped before answering".into()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn tiny_runs_go_inline_when_nothing_waits() {
        let pace = Pace::new(true);
        assert!(!pace.may_run_inline(), "not before a run was timed");
        pace.ran(10 * US);
        assert!(pace.may_run_inline());
        pace.sent();
        assert!(!pace.may_run_inline(), "a queued job goes first");
        pace.taken();
        // One preempted run does not stop inline runs.
        pace.ran(Duration::from_millis(5));
        assert!(pace.may_run_inline());
        let batching = Pace::new(false);
        batching.ran(US);
        assert!(!batching.may_run_inline(), "batching replicas never");
    }

    #[test]
    fn a_model_that_got_slow_leaves_the_async_threads() {
        let pace = Pace::new(true);
        pace.ran(10 * US);
        let mut runs = 0;
        while pace.may_run_inline() {
            pace.ran(Duration::from_millis(2));
            runs += 1;
        }
        assert!(
            runs <= 8,
            "{runs} slow runs before going back to the thread"
        );
        for _ in 0..40 {
            pace.ran(20 * US);
        }
        assert!(pace.may_run_inline(), "and back inline once fast again");
    }
}
