//! Named points where a crash test can make the process die on the spot, to
//! prove that a crash between two writes leaves a consistent state:
//! `FERRY_CRASH_AT=NAME:N` aborts the process (no destructors, no flushing,
//! like a power cut to the process) the N-th time `NAME` is reached.
//!
//! `FERRY_STOP_AT=NAME:N` instead stops the process there (SIGSTOP, as a
//! long GC pause, a debugger or a frozen VM would) until it is sent
//! SIGCONT: how the fencing test holds a leader just before its write.
//!
//! Only debug builds honour them (the tests run those); in release builds
//! [`reach`] compiles to nothing. The points:
//!
//! | name | where |
//! |---|---|
//! | `store.before_commit` | inside a SQLite transaction, its writes done, before `COMMIT` |
//! | `store.after_commit` | after `COMMIT`, before the caller acts on it (publishes a route, answers) |
//! | `blobs.before_rename` | an artifact's temporary file written and synced, before its rename |
//! | `blobs.before_dir_sync` | after the rename, before the directory is synced |
//! | `rollout.leader_step` | the leader's rollout loop, a rollout read (under the controller's lock), before it is stepped and stored |

/// Aborts the process if `FERRY_CRASH_AT` names this point and its count.
#[inline]
pub fn reach(name: &str) {
    #[cfg(debug_assertions)]
    armed::reach(name);
    #[cfg(not(debug_assertions))]
    let _ = name;
}

#[cfg(debug_assertions)]
mod armed {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Target {
        name: String,
        at: u64,
        seen: AtomicU64,
    }

    /// The point `variable` (`NAME:N`) names, read once into `cell`.
    fn target(cell: &'static OnceLock<Option<Target>>, variable: &str) -> Option<&'static Target> {
        cell.get_or_init(|| {
            let spec = std::env::var(variable).ok()?;
            let (name, at) = spec.split_once(':').unwrap_or((&spec, "1"));
            let at = at.parse().unwrap_or_else(|_| {
                panic!("{variable}={spec}: expected NAME:N, N a positive number")
            });
            Some(Target {
                name: name.to_string(),
                at,
                seen: AtomicU64::new(0),
            })
        })
        .as_ref()
    }

    /// Whether `variable` names this point and this is its N-th time.
    fn due(cell: &'static OnceLock<Option<Target>>, variable: &str, name: &str) -> Option<u64> {
        let t = target(cell, variable)?;
        (t.name == name && t.seen.fetch_add(1, Ordering::SeqCst) + 1 == t.at).then_some(t.at)
    }

    pub fn reach(name: &str) {
        static CRASH: OnceLock<Option<Target>> = OnceLock::new();
        static STOP: OnceLock<Option<Target>> = OnceLock::new();
        if let Some(at) = due(&CRASH, "FERRY_CRASH_AT", name) {
            eprintln!("FERRY_CRASH_AT: crashing at {name} (time {at})");
            std::process::abort();
        }
        if let Some(at) = due(&STOP, "FERRY_STOP_AT", name) {
            eprintln!("FERRY_STOP_AT: stopping at {name} (time {at}) until SIGCONT");
            // Every thread stops; `kill` returns once the process continues.
            let _ = std::process::Command::new("kill")
                .args(["-STOP", &std::process::id().to_string()])
                .status();
        }
    }
}
