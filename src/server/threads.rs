//! The serving threads, one per core (`--io-threads`): each is a
//! single-threaded tokio runtime that accepts connections from the shared
//! listeners itself and serves each one to its end on that thread — the
//! requests, the routing decision, the upstream request on the thread's own
//! keep-alive connections (`runtime::remote`) and the answer — so a request
//! wakes no other thread (but an in-process version's inference thread).
//! Beside each runs its companion at the lowest CPU priority, which sends
//! the thread's shadow copies (`gateway::copies`).
//! The control plane (the controller, the store, the rollout loop and the
//! control API's requests, `api::dispatch`) stays on the main runtime.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;

/// How many serving threads `--io-threads` asks for (0: one per core this
/// process may run on).
pub fn count(io_threads: usize) -> usize {
    match io_threads {
        0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        n => n,
    }
}

/// Runs `serve(part)` for each of `parts` (what one thread owns: its
/// copies of the listeners), each on its own thread's single-threaded
/// runtime, and returns when every one has returned (their connections
/// drained). What is left on a thread's runtime then (requests past the
/// drain timeout) is dropped with it.
pub async fn run<T, S, F>(parts: Vec<T>, serve: S) -> anyhow::Result<()>
where
    T: Send + 'static,
    S: Fn(T) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + 'static,
{
    let serve = Arc::new(serve);
    // Each thread holds a sender; the channel closes when the last one ends
    // (returned or panicked).
    let (running, mut ended) = tokio::sync::mpsc::channel::<()>(1);
    for (i, part) in parts.into_iter().enumerate() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start a serving thread's runtime")?;
        let (serve, running) = (serve.clone(), running.clone());
        std::thread::Builder::new()
            .name(format!("ferry-serve-{i}"))
            .spawn(move || {
                let companion = crate::gateway::copies::Companion::start(format!("ferry-copies-{i}"))
                    .inspect_err(|e| {
                        tracing::warn!(
                            "serving thread {i} sends its shadow copies itself (no companion thread: {e})"
                        )
                    });
                runtime.spawn(keep_a_timer_armed());
                runtime.block_on(serve(part));
                // A run stuck in ONNX Runtime must not hold the thread: the
                // drain timeout has passed.
                runtime.shutdown_background();
                drop(companion);
                drop(running);
            })
            .context("cannot start a serving thread")?;
    }
    drop(running);
    let _ = ended.recv().await;
    Ok(())
}

/// How often a serving thread's runtime wakes with nothing to do.
const TIMER_TICK: std::time::Duration = std::time::Duration::from_millis(250);

/// Keeps a timer pending on the serving thread's runtime, always due
/// sooner than any request's timeout. tokio's time driver wakes its own
/// thread (a write to its eventfd, then an extra turn of `epoll_wait`)
/// whenever a new timer is due before the driver's next planned wake-up,
/// which, with no timer pending, is every new timer: the timeout of every
/// request, half a dozen system calls apiece (BENCHMARKS.md, issue 17).
/// With this tick pending, a request's timeout (seconds away) is due after
/// it, and costs no wake-up; the tick itself costs four a second.
async fn keep_a_timer_armed() {
    let mut tick = tokio::time::interval(TIMER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn zero_is_one_thread_per_core_and_a_number_is_kept() {
        assert!(count(0) >= 1);
        assert_eq!(count(3), 3);
    }

    #[tokio::test]
    async fn runs_each_on_its_own_thread_and_waits_for_all() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        run(vec![0, 1, 2], move |i: usize| {
            let record = record.clone();
            async move {
                // A later thread ends first: run still waits for the others.
                tokio::time::sleep(std::time::Duration::from_millis(30 * (3 - i as u64))).await;
                let name = std::thread::current().name().map(str::to_string);
                record.lock().unwrap().push((i, name));
            }
        })
        .await
        .unwrap();
        let mut seen = seen.lock().unwrap().clone();
        seen.sort();
        let names: Vec<_> = (0..3)
            .map(|i| (i, Some(format!("ferry-serve-{i}"))))
            .collect();
        assert_eq!(seen, names);
    }
}
