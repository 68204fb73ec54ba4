//! Finding ONNX Runtime's shared library, in the order DESIGN.md gives:
//! the command line, `ORT_DYLIB_PATH`, beside the binary, the place the build
//! provisioned (`build.rs`).

use std::path::{Path, PathBuf};

use super::RuntimeError;

/// The library's file name on this platform.
pub const LIBRARY_NAME: &str = "libonnxruntime.so";

/// Where the build put the library (see `build.rs`), if it did.
const PROVISIONED: Option<&str> = option_env!("FERRY_ORT_PROVISIONED");

/// Returns the first library that exists, or the list of places tried.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(RuntimeError::LibraryLoad {
                path: p.display().to_string(),
                reason: "no such file (given with --ort-library)".into(),
            })
        };
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            return Err(RuntimeError::LibraryLoad {
                path: p.display().to_string(),
                reason: "no such file (given in ORT_DYLIB_PATH)".into(),
            });
        }
        return Ok(p);
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        candidates.push(dir.join(LIBRARY_NAME));
        candidates.push(dir.join("lib").join(LIBRARY_NAME));
    }
    if let Some(p) = PROVISIONED {
        candidates.push(PathBuf::from(p));
    }
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => Ok(p.clone()),
        None => Err(RuntimeError::LibraryNotFound {
            tried: candidates
                .iter()
                .map(|p| p.display().to_string())
                .chain(["ORT_DYLIB_PATH (unset)".to_string()])
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}
