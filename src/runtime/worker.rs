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
//! Neither does a thread that said so ([`no_inline_runs_on_this_thread`]):
//! the shadow copies' thread runs at the lowest CPU priority, and holding a
//! session there would make the version's other callers wait on it.
//!
//! With adaptive batching on, the worker waits up to the batch delay after a
//! request for others to arrive and runs them as one batch ([`batch`]).
//!
//! A caller that stops waiting (its timeout passed) stops the run it is
//! waiting for, when the worker thread runs it alone: ONNX Runtime's
//! terminate flag ([`Cancel`]), so a run that would spin for hours frees
//! the replica. Inline runs and batches are not stopped that way (an
//! inline run is one the async thread is inside; a batch serves others).
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

use ort::session::RunOptions;

use super::onnx::OnnxSession;
use super::{RuntimeError, batch};
use crate::protocol::Tensor;

/// A job's answer and when it was ready (the caller may notice it later:
/// a caller at a low priority waits for the CPU first).
type Reply = oneshot::Sender<(Result<Vec<Tensor>, RuntimeError>, Instant)>;

struct Job {
    /// Which job this is, for [`Cancel`] (from 1).
    id: u64,
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
    cancel: Cancel,
    next_id: AtomicU64,
}

impl Shared {
    /// Runs one request, timing it.
    fn run(
        &self,
        session: &mut OnnxSession,
        inputs: Vec<Tensor>,
        options: Option<&RunOptions>,
    ) -> Result<Vec<Tensor>, RuntimeError> {
        let started = Instant::now();
        let result = guarded(session, inputs, options);
        self.pace.ran(started.elapsed());
        result
    }
}

/// One session run; a panic in the engine becomes an error for this request.
fn guarded(
    session: &mut OnnxSession,
    inputs: Vec<Tensor>,
    options: Option<&RunOptions>,
) -> Result<Vec<Tensor>, RuntimeError> {
    std::panic::catch_unwind(AssertUnwindSafe(|| session.run_with(inputs, options)))
        .unwrap_or_else(|_| Err(RuntimeError::Inference("the engine panicked".into())))
}

/// Stops the worker thread's run of a job whose caller has gone. One
/// `RunOptions` per replica, made once (no per-run cost); its terminate
/// flag is set only while the thread runs exactly that job, under a lock
/// the thread also takes to move to its next job (and clear the flag), so
/// a stop can never reach another request.
struct Cancel {
    options: RunOptions,
    /// The job running alone on the thread (0: none) and whether its stop
    /// was asked for.
    running: Mutex<(u64, bool)>,
}

impl Cancel {
    fn new() -> Result<Cancel, RuntimeError> {
        Ok(Cancel {
            options: RunOptions::new().map_err(|e| RuntimeError::Inference(e.to_string()))?,
            running: Mutex::new((0, false)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, bool)> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The thread starts running job `id` alone.
    fn start(&self, id: u64) {
        *self.lock() = (id, false);
    }

    /// The thread is done with its job; a stop that came late is cleared.
    fn finish(&self) {
        let mut running = self.lock();
        if running.1 {
            let _ = self.options.unterminate();
        }
        *running = (0, false);
    }

    /// The caller of job `id` stopped waiting: stop its run if it is the
    /// one running.
    fn stop(&self, id: u64) {
        let mut running = self.lock();
        if running.0 == id && !running.1 {
            running.1 = self.options.terminate().is_ok();
        }
    }
}

/// Stops the job's run when the caller's future is dropped before the
/// answer came (the version's timeout).
struct Waiting<'a> {
    shared: &'a Shared,
    id: u64,
    answered: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.shared.cancel.stop(self.id);
        }
    }
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

/// Runs jobs one by one; each can be stopped by its caller ([`Cancel`]).
fn run_each(shared: &Shared, session: &mut OnnxSession, jobs: Vec<Job>) {
    for job in jobs {
        shared.cancel.start(job.id);
        // After `start`: a caller that leaves from here on stops the run.
        if job.reply.is_closed() {
            shared.cancel.finish();
            continue;
        }
        let result = shared.run(session, job.inputs, Some(&shared.cancel.options));
        shared.cancel.finish();
        let _ = job.reply.send((result, Instant::now()));
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
    match guarded(session, merged, None)
        .ok()
        .and_then(|out| batch::split(out, &rows))
    {
        Some(parts) => {
            for (job, outputs) in jobs.into_iter().zip(parts) {
                let _ = job.reply.send((Ok(outputs), Instant::now()));
            }
        }
        None => run_each(shared, session, jobs),
    }
}

thread_local! {
    /// Whether this thread may run a request inline.
    static INLINE: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// From now on, requests made on this thread always run on the replica's
/// worker thread, never inline on this one.
pub fn no_inline_runs_on_this_thread() {
    INLINE.with(|i| i.set(false));
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
        let cancel = Cancel::new().map_err(|e| std::io::Error::other(e.to_string()))?;
        let shared = Arc::new(Shared {
            session: Mutex::new(session),
            pace: Pace::new(batching.is_none()),
            cancel,
            next_id: AtomicU64::new(1),
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
        self.infer_timed(inputs).await.map(|(outputs, _)| outputs)
    }

    /// [`Worker::infer`], with how long the answer took to be ready when
    /// the worker thread ran it: from the request's hand-over to the end of
    /// its run, without the time this thread then took to notice (a
    /// low-priority thread's wait for the CPU). `None` for an inline run.
    pub async fn infer_timed(
        &self,
        inputs: Vec<Tensor>,
    ) -> Result<(Vec<Tensor>, Option<Duration>), RuntimeError> {
        if self.shared.pace.may_run_inline()
            && INLINE.with(std::cell::Cell::get)
            && let Ok(mut session) = self.shared.session.try_lock()
        {
            return Ok((self.shared.run(&mut session, inputs, None)?, None));
        }
        let handed = Instant::now();
        let (reply, answer) = oneshot::channel();
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        self.shared.pace.sent();
        match self.queue.try_send(Job { id, inputs, reply }) {
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
        let mut waiting = Waiting {
            shared: &self.shared,
            id,
            answered: false,
        };
        let answer = answer.await;
        waiting.answered = true;
        let (outputs, ready) = answer.map_err(|_| {
            RuntimeError::Unavailable("the replica stopped before answering".into())
        })?;
        Ok((outputs?, Some(ready.saturating_duration_since(handed))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    /// A worker for the example `cancer-v1` model, without batching.
    fn cancer_worker(name: &str) -> Arc<Worker> {
        let onnx = crate::runtime::OnnxRuntime::for_tests();
        let model =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/models/cancer-v1.onnx");
        let session = onnx.session_from_file(&model, 1).unwrap();
        Arc::new(Worker::spawn(name, session, 8, None).unwrap())
    }

    /// A thread that said so never runs inline, even when the replica
    /// would take it (the shadow copies' thread: `gateway::copies`).
    #[test]
    fn a_thread_without_inline_runs_hands_every_request_to_the_worker() {
        let worker = cancer_worker("inline-test");
        let input = || {
            vec![Tensor {
                name: "input".into(),
                shape: vec![1, 30],
                data: crate::protocol::TensorData::Fp32(vec![0.5; 30]),
            }]
        };
        let sent = |w: &Worker| w.shared.next_id.load(Ordering::Relaxed);
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        // The replica's recent runs taken as tiny (set here rather than
        // waited for: on a loaded machine they may never be), and nothing
        // queued: the replica would take a run inline.
        let tiny = |w: &Worker| w.shared.pace.run_nanos.store(0, Ordering::Relaxed);
        // Here it does: nothing is sent to the worker thread.
        runtime().block_on(async {
            tiny(&worker);
            let before = sent(&worker);
            worker.infer(input()).await.unwrap();
            assert_eq!(sent(&worker), before, "this thread runs inline");
        });
        let w = worker.clone();
        std::thread::spawn(move || {
            no_inline_runs_on_this_thread();
            runtime().block_on(async {
                for _ in 0..20 {
                    tiny(&w);
                    assert!(
                        w.shared.pace.may_run_inline(),
                        "the replica would take this run inline"
                    );
                    let before = sent(&w);
                    w.infer(input()).await.unwrap();
                    assert_eq!(sent(&w), before + 1, "every run on the worker thread");
                }
            });
        })
        .join()
        .unwrap();
    }

    /// A run's time is the worker thread's: a caller that got to the
    /// answer late (blocked here; on a busy gateway, the shadow copies'
    /// low-priority thread waiting for the CPU) does not count its wait.
    #[test]
    fn a_runs_time_does_not_count_the_callers_wait_to_notice_it() {
        let worker = cancer_worker("timed-test");
        let handed_over = |w: &Worker| w.shared.next_id.load(Ordering::Relaxed) > 1;
        let (took, wall) = std::thread::spawn(move || {
            no_inline_runs_on_this_thread();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let started = Instant::now();
                let w = worker.clone();
                let run = tokio::spawn(async move {
                    let input = vec![Tensor {
                        name: "input".into(),
                        shape: vec![1, 30],
                        data: crate::protocol::TensorData::Fp32(vec![0.5; 30]),
                    }];
                    w.infer_timed(input).await.unwrap().1
                });
                // The request is handed over; then this thread is busy
                // while the worker answers.
                tokio::task::yield_now().await;
                assert!(handed_over(&worker), "handed over before the wait");
                std::thread::sleep(Duration::from_millis(600));
                (run.await.unwrap(), started.elapsed())
            })
        })
        .join()
        .unwrap();
        let took = took.expect("a run on the worker thread is timed");
        assert!(wall >= Duration::from_millis(600), "{wall:?}");
        assert!(
            took < Duration::from_millis(400),
            "the caller took {wall:?}; the run was timed {took:?}"
        );
    }

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
