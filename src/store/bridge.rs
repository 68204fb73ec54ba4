//! The bridge from the synchronous store traits to async clients: a small
//! tokio runtime a store owns ([`runtime`]), and [`wait`], which runs one
//! future there and blocks the calling thread for its answer.
//!
//! The traits are called from tokio worker threads, blocking-pool threads
//! and current-thread test runtimes, where `Runtime::block_on` panics; a
//! runtime of the store's own and a channel work from all of them. Both the
//! PostgreSQL store and the bucket of artifacts go through here.

use std::future::Future;

/// A multi-threaded runtime of `threads` threads named `name`, with I/O and
/// timers. Its owner shuts it down with `shutdown_background` when dropped
/// (dropping a runtime may not block on an async thread).
pub fn runtime(name: &str, threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()
}

/// Runs `work` on `runtime` and waits for its answer; None when the runtime
/// dropped it unfinished (it is shutting down).
///
/// Called on a worker of a multi-threaded runtime, the wait hands that
/// worker's other tasks to another thread first (`block_in_place`): a call
/// that waits out its time limit on an unreachable store then stalls only
/// its own caller, never the HTTP API or the scrape served beside it.
pub fn wait<T, F>(runtime: &tokio::runtime::Runtime, work: F) -> Option<T>
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = tx.send(work.await);
    });
    let on_workers = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    match on_workers {
        true => tokio::task::block_in_place(|| rx.recv().ok()),
        false => rx.recv().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_future_runs_on_the_bridge_from_a_plain_thread() {
        let rt = runtime("bridge-test", 1).unwrap();
        let answer = wait(&rt, async {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            41 + 1
        });
        assert_eq!(answer, Some(42));
        rt.shutdown_background();
    }

    /// A task waiting on the bridge does not hold its worker: with one
    /// worker, another task of the same runtime goes on meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_wait_on_a_worker_leaves_the_other_tasks_running() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        let rt = Arc::new(runtime("bridge-test", 1).unwrap());
        let ticks = Arc::new(AtomicU64::new(0));
        let counting = ticks.clone();
        tokio::spawn(async move {
            loop {
                counting.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        });
        tokio::task::yield_now().await;
        let before = ticks.load(Ordering::Relaxed);
        let answer = wait(&rt, async {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            "slow"
        });
        let during = ticks.load(Ordering::Relaxed) - before;
        assert_eq!(answer, Some("slow"));
        assert!(
            during >= 10,
            "the other task ticked {during} times in 300 ms"
        );
        Arc::try_unwrap(rt).unwrap().shutdown_background();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_future_runs_on_the_bridge_from_inside_a_current_thread_runtime() {
        let rt = runtime("bridge-test", 1).unwrap();
        assert_eq!(wait(&rt, async { "answer" }), Some("answer"));
        rt.shutdown_background();
    }
}
