//! Provisions ONNX Runtime's shared library beside the `ferry` binary, so that
//! `cargo build`, `cargo run` and `cargo test` need no manual step, and
//! compiles the gRPC service (`proto/grpc_predict_v2.proto`) with the
//! pure-Rust `protox`, so no system `protoc` is needed.
//!
//! The library comes from the pinned `onnxruntime` wheel (see
//! `scripts/fetch-onnxruntime.py`). If it cannot be fetched, the build still
//! succeeds with a warning, and `ferry serve` says exactly what to do.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    compile_proto();
    println!("cargo:rerun-if-changed=scripts/fetch-onnxruntime.py");
    println!("cargo:rerun-if-env-changed=FERRY_SKIP_ORT_FETCH");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // OUT_DIR is <target>/<profile>/build/ferry-<hash>/out: the binary lives in <profile>.
    let Some(profile_dir) = out_dir.ancestors().nth(3) else {
        return;
    };
    let lib = profile_dir.join("libonnxruntime.so");
    println!("cargo:rustc-env=FERRY_ORT_PROVISIONED={}", lib.display());
    // Skipped builds (the fuzz targets) must not watch a file that will never
    // exist: cargo would rebuild the crate every time.
    if std::env::var_os("FERRY_SKIP_ORT_FETCH").is_some() {
        return;
    }
    println!("cargo:rerun-if-changed={}", lib.display());
    if lib.exists() {
        return;
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let status = Command::new(&python)
        .arg("scripts/fetch-onnxruntime.py")
        .arg(profile_dir)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => println!(
            "cargo:warning=could not provision ONNX Runtime ({s}); run `{python} scripts/fetch-onnxruntime.py {}` or set ORT_DYLIB_PATH",
            profile_dir.display()
        ),
        Err(e) => println!(
            "cargo:warning=could not run {python} to provision ONNX Runtime ({e}); install Python 3 with pip, or set ORT_DYLIB_PATH"
        ),
    }
}

/// Generates the `inference` package's messages, client and server from the
/// proto file kept in the repository.
fn compile_proto() {
    const PROTO: &str = "proto/grpc_predict_v2.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    let files = protox::compile([PROTO], ["proto"])
        .unwrap_or_else(|e| panic!("{PROTO} does not compile: {e}"));
    tonic_prost_build::configure()
        .build_transport(false)
        .compile_fds(files)
        .unwrap_or_else(|e| panic!("cannot generate the gRPC code from {PROTO}: {e}"));
}
