//! Named points where a crash test can make the process die on the spot, to
//! prove that a crash between two writes leaves a consistent state:
//! `FERRY_CRASH_AT=NAME:N` aborts the process (no destructors, no flushing,
//! like a power cut to the process) the N-th time `NAME` is reached.
//!
//! Only debug builds honour it (the tests run those); in release builds
//! [`reach`] compiles to nothing. The points:
//!
//! | name | where |
//! |---|---|
//! | `store.before_commit` | inside a SQLite transaction, its writes done, before `COMMIT` |
//! | `store.after_commit` | after `COMMIT`, before the caller acts on it (publishes a route, answers) |
//! | `blobs.before_rename` | an artifact's temporary file written and synced, before its rename |
//! | `blobs.before_dir_sync` | after the rename, before the directory is synced |

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

    fn target() -> Option<&'static Target> {
        static TARGET: OnceLock<Option<Target>> = OnceLock::new();
        TARGET
            .get_or_init(|| {
                let spec = std::env::var("FERRY_CRASH_AT").ok()?;
                let (name, at) = spec.split_once(':').unwrap_or((&spec, "1"));
                let at = at.parse().unwrap_or_else(|_| {
                    panic!("FERRY_CRASH_AT={spec}: expected NAME:N, N a positive number")
                });
                Some(Target {
                    name: name.to_string(),
                    at,
                    seen: AtomicU64::new(0),
                })
            })
            .as_ref()
    }

    pub fn reach(name: &str) {
        if let Some(t) = target()
            && t.name == name
            && t.seen.fetch_add(1, Ordering::SeqCst) + 1 == t.at
        {
            eprintln!("FERRY_CRASH_AT: crashing at {name} (time {})", t.at);
            std::process::abort();
        }
    }
}
