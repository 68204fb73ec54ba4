//! Where shadow copies run: each serving thread has a companion thread at
//! the lowest CPU priority (Linux's `SCHED_IDLE`, and `nice` 19) with its
//! own single-threaded runtime, and its own keep-alive connections to the
//! shadow. A serving thread hands a copy over once, after the primary has
//! answered; the kernel then runs the copy's work — its request, the
//! answers' decoding, the comparison, an in-process shadow's inference —
//! only when no request is waiting for the core, and a serving thread that
//! wakes takes the core back at once (under `SCHED_IDLE`; at `nice` 19
//! alone the copy could keep it for the rest of its time slice, a
//! millisecond or more: BENCHMARKS.md). When
//! production keeps the core busy, copies wait, their slots fill and
//! further copies are dropped and counted (`mirror`), never queued without
//! bound.
//!
//! A thread without a companion (tests, the control plane's runtime) runs
//! its copies as tasks of its own runtime.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;

use tokio::sync::mpsc;

/// A copy's whole work, from its request to its comparison.
pub type Work = Pin<Box<dyn Future<Output = ()> + Send>>;

thread_local! {
    static COMPANION: RefCell<Option<mpsc::UnboundedSender<Work>>> = const { RefCell::new(None) };
}

/// The nice value of a copy thread: the lowest a thread can give itself
/// without privileges (what counts when `SCHED_IDLE` is refused).
const NICE: i32 = 19;

/// The companion thread of the serving thread that started it; copies
/// started on that thread go to it while this is held. Dropping it closes
/// the hand-off: the companion finishes the copies it holds (each bounded
/// by its version's timeout) and ends, without holding up the serving
/// thread's own end.
pub struct Companion(());

impl Companion {
    /// Starts a companion thread named `name` for the calling thread.
    pub fn start(name: String) -> std::io::Result<Companion> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Work>();
        std::thread::Builder::new().name(name).spawn(move || {
            lower_this_threads_priority();
            runtime.block_on(async move {
                let mut running = tokio::task::JoinSet::new();
                loop {
                    tokio::select! {
                        work = rx.recv() => match work {
                            Some(work) => { running.spawn(work); }
                            None => break,
                        },
                        Some(_) = running.join_next() => {}
                    }
                }
                // Copies already sent finish (each is bounded by its
                // version's timeout); none is cut off mid-request.
                while running.join_next().await.is_some() {}
            });
        })?;
        COMPANION.with(|c| *c.borrow_mut() = Some(tx));
        Ok(Companion(()))
    }
}

impl Drop for Companion {
    fn drop(&mut self) {
        COMPANION.with(|c| c.borrow_mut().take());
    }
}

/// Runs a copy's work: on this thread's companion when it has one,
/// otherwise as a task of the current runtime.
pub fn run(work: Work) {
    let work = COMPANION.with(|c| match &*c.borrow() {
        Some(tx) => tx.send(work).err().map(|e| e.0),
        None => Some(work),
    });
    if let Some(work) = work {
        tokio::spawn(work);
    }
}

/// `SCHED_IDLE` (allowed without privileges since Linux 2.6.39), then nice
/// 19: on Linux, PRIO_PROCESS with a thread id sets that thread's alone.
#[cfg(target_os = "linux")]
fn lower_this_threads_priority() {
    use thread_priority::{NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy};
    let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
    // Setting the policy also sets nice 0, which a thread already niced may
    // not do: what counts is the policy read back below.
    let _ = thread_priority::set_thread_priority_and_policy(
        thread_priority::thread_native_id(),
        ThreadPriority::Min,
        idle,
    );
    let nice = rustix::process::setpriority_process(Some(rustix::thread::gettid()), NICE);
    match (thread_priority::thread_schedule_policy(), nice) {
        (Ok(policy), _) if policy == idle => {}
        (policy, Ok(())) => tracing::warn!(
            "the shadow copies' thread runs at nice {NICE} but not under SCHED_IDLE (policy {policy:?}): a copy may hold a serving thread's core for the rest of its time slice"
        ),
        (policy, Err(e)) => tracing::warn!(
            "the shadow copies' thread keeps the serving threads' priority (policy {policy:?}; setpriority: {e}): a shadow may add to the primary's latency when the core is busy"
        ),
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_this_threads_priority() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    fn nice_of(tid: rustix::thread::Pid) -> i32 {
        rustix::process::getpriority_process(Some(tid)).unwrap()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn copies_run_on_the_companion_at_the_lowest_priority_and_finish_after_it_is_dropped() {
        let mine = nice_of(rustix::thread::gettid());
        let companion = Companion::start("ferry-copy-test".into()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..3 {
            let tx = tx.clone();
            run(Box::pin(async move {
                // A copy still waiting when the companion is dropped is
                // finished, not cut off.
                tokio::time::sleep(std::time::Duration::from_millis(20 * i)).await;
                let name = std::thread::current().name().map(str::to_string);
                let policy = thread_priority::thread_schedule_policy().unwrap();
                tx.send((name, policy, nice_of(rustix::thread::gettid())))
                    .unwrap();
            }));
        }
        drop(companion);
        drop(tx);
        let seen: Vec<_> = rx.iter().collect();
        assert_eq!(seen.len(), 3, "every copy sent ran to its end");
        for (name, policy, nice) in seen {
            assert_eq!(name.as_deref(), Some("ferry-copy-test"));
            assert_eq!(
                policy,
                thread_priority::ThreadSchedulePolicy::Normal(
                    thread_priority::NormalThreadSchedulePolicy::Idle
                )
            );
            assert_eq!(nice, NICE);
        }
        // The serving thread's own priority is untouched.
        assert_eq!(nice_of(rustix::thread::gettid()), mine);
    }

    #[tokio::test]
    async fn without_a_companion_copies_run_on_this_runtime() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let here = std::thread::current().id();
        run(Box::pin(async move {
            tx.send(std::thread::current().id()).unwrap();
        }));
        assert_eq!(rx.await.unwrap(), here);
    }
}
