//! Where shadow copies run: each serving thread has a companion thread at
//! the lowest CPU priority (`nice` 19) with its own single-threaded
//! runtime, and its own keep-alive connections to the shadow. A serving thread hands a copy over once, after the primary has
//! answered; the kernel then runs the copy's work on this thread — its
//! request to a remote shadow, the answers' decoding, the comparison —
//! mostly when no request is waiting for the core (the kernel gives a nice
//! 19 thread about 1.5 % of a core that a normal thread wants). When
//! production keeps the core busy, copies wait, their slots fill and further copies are dropped and
//! counted (`mirror`), never queued without bound.
//!
//! What does not run here, at the lowest priority: an in-process shadow's
//! inference (always on the version's worker thread: a session held by
//! this thread would make the version's other callers wait on it), and a
//! `grpc://` shadow's HTTP/2 connection (on the runtime that opened it).
//!
//! A copy's latency is not this thread's: how long the shadow's answer
//! took to be ready is told by the engine (a worker thread's run; for a
//! plain-HTTP remote, the kernel's receive time of the answer), without the
//! time this thread then waited for the CPU (`mirror`).
//!
//! A thread without a companion (tests, the control plane's runtime, which
//! serves inference posts the fast path does not take) runs its copies as
//! tasks of its own runtime, at its priority.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;

use tokio::sync::mpsc;

/// A copy's whole work, from its request to its comparison.
pub type Work = Pin<Box<dyn Future<Output = ()> + Send>>;

thread_local! {
    static COMPANION: RefCell<Option<mpsc::UnboundedSender<Work>>> = const { RefCell::new(None) };
}

/// The nice value of a copy thread: the lowest priority a thread can give
/// itself without privileges.
const NICE: i32 = 19;

/// The companion thread of the serving thread that started it; copies
/// started on that thread go to it while this is held. Dropping it closes
/// the hand-off: the companion goes on with the copies it holds (each
/// bounded by its version's timeout) and then ends, without holding up the
/// serving thread's own end; copies still running when the process exits
/// are cut off, uncounted, as copies on any runtime are.
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
            crate::runtime::worker::no_inline_runs_on_this_thread();
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

/// On Linux, PRIO_PROCESS with a thread id sets that thread's nice value
/// alone. Not `SCHED_IDLE`: it measured no better, and a `SCHED_IDLE`
/// thread gets no CPU at all while other processes keep every core busy,
/// where nice 19 keeps a small share (BENCHMARKS.md).
#[cfg(target_os = "linux")]
fn lower_this_threads_priority() {
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), NICE) {
        tracing::warn!(
            "the shadow copies' thread keeps the serving threads' priority (setpriority: {e}); a shadow may add to the primary's latency when the core is busy"
        );
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
                tx.send((name, nice_of(rustix::thread::gettid()))).unwrap();
            }));
        }
        drop(companion);
        drop(tx);
        let seen: Vec<_> = rx.iter().collect();
        assert_eq!(seen.len(), 3, "every copy sent ran to its end");
        for (name, nice) in seen {
            assert_eq!(name.as_deref(), Some("ferry-copy-test"));
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
