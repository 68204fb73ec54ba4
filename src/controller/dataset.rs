//! QA datasets a spec names on the server's own disk (`qa.dataset` without
//! `qa.content`): which paths a spec may name, and reading them safely.
//!
//! A spec is untrusted input, so a path is resolved inside `ferry serve
//! --qa-dir` only (no absolute paths, no `..`, no symlink out of it), the
//! file is opened with `O_NONBLOCK` (opening a FIFO cannot wait for a
//! writer), the *open* file is checked to be a regular file of at most
//! [`limits::QA_DATASET_BYTES`] (no gap between a check and the open), and
//! all of it runs on a blocking thread, never on the async threads.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use crate::spec::limits;

const FIELD: &str = "strategy.blue_green.qa.dataset";

/// The path of `dataset` inside `qa_dir`, refused (naming the field) when
/// the server accepts no server-side datasets, or when it would leave the
/// directory.
pub fn resolve(qa_dir: Option<&Path>, dataset: &str) -> Result<PathBuf, String> {
    let Some(dir) = qa_dir else {
        return Err(format!(
            "{FIELD} {dataset:?} would be read from the server's disk, which this server does not allow: send the dataset's content with the spec (`ferry apply` and `ferry deploy --qa-dataset` do), or start the server with --qa-dir DIR and name a file inside it"
        ));
    };
    let relative = Path::new(dataset);
    let escapes = relative
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
    if dataset.is_empty() || escapes {
        return Err(format!(
            "{FIELD} {dataset:?} must be a relative path inside --qa-dir {} (no leading /, no ..)",
            dir.display()
        ));
    }
    Ok(dir.join(relative))
}

/// An open dataset file that was checked: regular, inside `qa_dir`, and
/// small enough.
fn open_checked(qa_dir: &Path, path: &Path, dataset: &str) -> Result<(std::fs::File, u64), String> {
    let cannot =
        |e: std::io::Error| format!("{FIELD} {dataset:?} cannot be opened on the server: {e}");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(cannot)?;
    let meta = file.metadata().map_err(cannot)?;
    if !meta.file_type().is_file() {
        return Err(format!(
            "{FIELD} {dataset:?} is not a regular file (a FIFO, device, socket or directory); name a JSON Lines file inside --qa-dir"
        ));
    }
    // Where the open file really is (symlinks resolved), from the descriptor
    // itself: a symlink inside --qa-dir must not lead out of it.
    let real = std::fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&file)
    ))
    .or_else(|_| path.canonicalize())
    .map_err(cannot)?;
    let root = qa_dir
        .canonicalize()
        .map_err(|e| format!("--qa-dir {} cannot be read: {e}", qa_dir.display()))?;
    if !real.starts_with(&root) {
        return Err(format!(
            "{FIELD} {dataset:?} leads outside --qa-dir {} (to {}); name a file inside it",
            qa_dir.display(),
            real.display()
        ));
    }
    if meta.len() > limits::QA_DATASET_BYTES {
        return Err(too_big(dataset, meta.len()));
    }
    Ok((file, meta.len()))
}

fn too_big(dataset: &str, bytes: u64) -> String {
    format!(
        "{FIELD} {dataset:?} is {bytes} bytes; at most {} ({} MiB) are allowed",
        limits::QA_DATASET_BYTES,
        limits::QA_DATASET_BYTES >> 20
    )
}

/// Blocking: checks that `dataset` can be used (at apply time), without
/// reading it.
pub fn check(qa_dir: Option<&Path>, dataset: &str) -> Result<(), String> {
    let path = resolve(qa_dir, dataset)?;
    open_checked(qa_dir.expect("resolve needs it"), &path, dataset).map(|_| ())
}

/// Blocking: reads `dataset` as text, at most [`limits::QA_DATASET_BYTES`]
/// even if the file grows while it is read.
pub fn read(qa_dir: Option<&Path>, dataset: &str) -> Result<String, String> {
    let path = resolve(qa_dir, dataset)?;
    let (file, len) = open_checked(qa_dir.expect("resolve needs it"), &path, dataset)?;
    let mut text = String::with_capacity(len as usize);
    file.take(limits::QA_DATASET_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("{FIELD} {dataset:?} cannot be read as UTF-8 text: {e}"))?;
    if text.len() as u64 > limits::QA_DATASET_BYTES {
        return Err(too_big(dataset, text.len() as u64));
    }
    Ok(text)
}

/// [`check`] or [`read`] on a blocking thread.
pub async fn off_thread<T: Send + 'static>(
    qa_dir: Option<PathBuf>,
    dataset: String,
    f: fn(Option<&Path>, &str) -> Result<T, String>,
) -> Result<T, String> {
    tokio::task::spawn_blocking(move || f(qa_dir.as_deref(), &dataset))
        .await
        .unwrap_or_else(|e| Err(format!("reading {FIELD} failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qa_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("good.jsonl"), "{\"label\": 1}\n").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/b.jsonl"), "x").unwrap();
        dir
    }

    #[test]
    fn a_regular_file_inside_the_dir_is_read() {
        let dir = qa_dir();
        assert_eq!(
            read(Some(dir.path()), "good.jsonl").unwrap(),
            "{\"label\": 1}\n"
        );
        assert_eq!(read(Some(dir.path()), "./sub/b.jsonl").unwrap(), "x");
    }

    #[test]
    fn without_a_qa_dir_a_server_side_path_is_refused_with_the_hint() {
        let err = check(None, "holdout.jsonl").unwrap_err();
        assert!(
            err.starts_with("strategy.blue_green.qa.dataset \"holdout.jsonl\""),
            "{err}"
        );
        assert!(
            err.contains("send the dataset's content with the spec"),
            "{err}"
        );
        assert!(err.contains("--qa-dir"), "{err}");
    }

    #[test]
    fn paths_that_leave_the_dir_are_refused() {
        let dir = qa_dir();
        for bad in ["/etc/passwd", "../x", "sub/../../x", "", "sub/.."] {
            let err = check(Some(dir.path()), bad).unwrap_err();
            assert!(
                err.contains("must be a relative path inside --qa-dir"),
                "{bad}: {err}"
            );
        }
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("out")).unwrap();
        let err = read(Some(dir.path()), "out").unwrap_err();
        assert!(err.contains("leads outside --qa-dir"), "{err}");
    }

    #[test]
    fn a_fifo_or_a_device_is_refused_at_once() {
        let dir = qa_dir();
        let fifo = dir.path().join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("zero")).unwrap();
        for name in ["fifo", "zero", "sub"] {
            // Opening a FIFO without O_NONBLOCK would wait for a writer forever.
            let started = std::time::Instant::now();
            let err = read(Some(dir.path()), name).unwrap_err();
            assert!(err.contains("is not a regular file"), "{name}: {err}");
            assert!(started.elapsed() < std::time::Duration::from_secs(1));
        }
    }

    #[test]
    fn a_file_over_the_limit_is_refused_naming_the_limit() {
        let dir = qa_dir();
        let big = std::fs::File::create(dir.path().join("big")).unwrap();
        big.set_len(limits::QA_DATASET_BYTES + 1).unwrap();
        let err = check(Some(dir.path()), "big").unwrap_err();
        assert_eq!(
            err,
            "strategy.blue_green.qa.dataset \"big\" is 67108865 bytes; at most 67108864 (64 MiB) are allowed"
        );
    }
}
