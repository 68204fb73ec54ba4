/// The system allocator by default, on purpose (BENCHMARKS.md, "The
/// allocator"): with a worker thread per ONNX Runtime session, mimalloc's
/// per-thread heaps cost 0.2 MiB per loaded version and 0.3 MiB per serving
/// version, for 10–15 % more requests/s through the gateway at saturation.
/// `--features mimalloc` chooses it for deployments with few models.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = ferry::cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                // deadpool says each pooled connection it drops; the store
                // says an outage once when it starts and once when it ends.
                .unwrap_or_else(|_| "info,ort=warn,deadpool.postgres=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // `serve` accepts and answers requests on its own serving threads
    // (`--io-threads`); this runtime keeps the control plane (controller,
    // store, rollout loop, the control API's requests): two threads, or
    // what `--io-threads` says.
    if let ferry::cli::Command::Serve(args) = &cli.command {
        builder.worker_threads(match args.io_threads {
            0 => 2,
            n => n,
        });
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(ferry::cli::run(cli));
    // Dropping the runtime would wait for every blocking task, and one may
    // be stuck in ONNX Runtime (a warm-up being stopped): `serve` has already
    // waited its drain timeout, so give them a moment and exit regardless.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
