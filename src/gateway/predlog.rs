//! The sampled prediction log (off by default): a fraction of requests
//! written as JSON Lines — request id, model, version, role, inputs and
//! outputs — for later offline comparison. Bounded twice: a bounded queue to
//! the writer thread (a full queue drops the line and counts it, never
//! slowing a request), and a size limit on the file (rotated to `FILE.1`).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use serde_json::json;

use crate::metrics::Role;
use crate::protocol::Tensor;
use crate::units::now_rfc3339;

/// Where and how much to log.
#[derive(Debug, Clone)]
pub struct PredictionLogSettings {
    pub path: PathBuf,
    /// Fraction of requests logged, 0–1.
    pub sample: f64,
    /// Size at which the file is rotated to `FILE.1`.
    pub max_bytes: u64,
}

pub struct PredictionLog {
    sample: f64,
    lines: SyncSender<String>,
    dropped: AtomicU64,
}

fn tensors(ts: &[Tensor]) -> serde_json::Value {
    ts.iter()
        .map(|t| json!({"name": t.name, "datatype": t.datatype().as_str(), "shape": t.shape, "data": t.data}))
        .collect()
}

fn writer(settings: PredictionLogSettings, lines: Receiver<String>) {
    let open = |path: &PathBuf| OpenOptions::new().create(true).append(true).open(path);
    let mut file = match open(&settings.path) {
        Ok(f) => BufWriter::new(f),
        Err(e) => {
            tracing::error!(
                "prediction log {} cannot be opened: {e}",
                settings.path.display()
            );
            return;
        }
    };
    let mut size = file.get_ref().metadata().map_or(0, |m| m.len());
    while let Ok(line) = lines.recv() {
        let mut batch = vec![line];
        batch.extend(lines.try_iter().take(1024));
        for line in batch {
            if size + line.len() as u64 > settings.max_bytes && size > 0 {
                let _ = file.flush();
                let rotated = PathBuf::from(format!("{}.1", settings.path.display()));
                match std::fs::rename(&settings.path, &rotated).and_then(|()| open(&settings.path))
                {
                    Ok(f) => file = BufWriter::new(f),
                    Err(e) => {
                        tracing::error!("prediction log rotation failed: {e}");
                        return;
                    }
                }
                size = 0;
            }
            if file
                .write_all(line.as_bytes())
                .and_then(|()| file.write_all(b"\n"))
                .is_err()
            {
                tracing::error!(
                    "prediction log {} cannot be written; logging stops",
                    settings.path.display()
                );
                return;
            }
            size += line.len() as u64 + 1;
        }
        let _ = file.flush();
    }
}

impl PredictionLog {
    /// Starts the writer thread.
    pub fn start(settings: PredictionLogSettings) -> std::io::Result<PredictionLog> {
        // Fail at start-up, not later, when the file cannot be created.
        drop(
            File::options()
                .create(true)
                .append(true)
                .open(&settings.path)?,
        );
        let (tx, rx) = sync_channel(4096);
        let sample = settings.sample.clamp(0.0, 1.0);
        std::thread::Builder::new()
            .name("ferry-predlog".into())
            .spawn(move || writer(settings, rx))?;
        Ok(PredictionLog {
            sample,
            lines: tx,
            dropped: AtomicU64::new(0),
        })
    }

    /// Whether to log this request (decided before it runs, so the inputs
    /// are copied only when they will be written).
    pub fn sampled(&self) -> bool {
        self.sample > 0.0 && fastrand::f64() < self.sample
    }

    pub fn write(
        &self,
        id: &str,
        model: &str,
        version: &str,
        role: Role,
        inputs: &[Tensor],
        outputs: &[Tensor],
    ) {
        let line = json!({
            "at": now_rfc3339(), "id": id, "model": model, "version": version, "role": role.as_str(),
            "inputs": tensors(inputs), "outputs": tensors(outputs),
        })
        .to_string();
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.lines.try_send(line)
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lines dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TensorData;

    #[test]
    fn writes_sampled_lines_and_rotates_at_the_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("predictions.jsonl");
        let log = PredictionLog::start(PredictionLogSettings {
            path: path.clone(),
            sample: 1.0,
            max_bytes: 2_000,
        })
        .unwrap();
        assert!(log.sampled());
        let t = Tensor {
            name: "x".into(),
            shape: vec![1, 2],
            data: TensorData::Fp32(vec![1.0, 2.0]),
        };
        for i in 0..40 {
            log.write(
                &format!("r{i}"),
                "m",
                "1",
                Role::Stable,
                std::slice::from_ref(&t),
                std::slice::from_ref(&t),
            );
        }
        drop(log);
        // The writer thread finishes on its own once the log is dropped:
        // wait (bounded) until the last line is in the current file. The
        // file is briefly absent between rename and re-open, so a missing
        // file means "not yet", not failure.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let current = loop {
            let current = std::fs::read_to_string(&path).unwrap_or_default();
            let last_id = current
                .lines()
                .last()
                .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .map(|v| v["id"].clone());
            if last_id == Some(json!("r39")) {
                break current;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the writer writes all 40 lines within 10 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let rotated = PathBuf::from(format!("{}.1", path.display()));
        assert!(rotated.exists(), "the file was rotated at 2,000 bytes");
        assert!(current.len() <= 2_000);
        let first: serde_json::Value =
            serde_json::from_str(current.lines().next().unwrap()).unwrap();
        assert_eq!(first["model"], "m");
        assert_eq!(first["inputs"][0]["data"], json!([1.0, 2.0]));
    }
}
