//! The `ferry` command line: `serve` starts the server; every other command is
//! a client of the control API (it never reaches into server internals).
//!
//! Layout: [`client`] (HTTP to the server, token lookup, error display),
//! [`config`] (`serve --config FILE`), [`model`] (the registry commands),
//! [`table`] (aligned human output).
//! Command output goes through [`outln!`]: a closed pipe (`ferry … | head`)
//! ends the command quietly, as it does for other Unix tools.

/// `println!` for command output. When the reader has gone (`ferry model
/// show cancer | head -3`), the command stops quietly with status 0, as
/// ripgrep does, instead of panicking.
macro_rules! outln {
    () => { $crate::cli::write_out(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::cli::write_out(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `print!` for command output, with [`outln!`]'s handling of a closed pipe.
macro_rules! out {
    ($($arg:tt)*) => { $crate::cli::write_out(format_args!($($arg)*)) };
}

pub mod client;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod model;
pub mod rollout;
pub mod store;
pub mod table;
pub mod traffic;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::api::Limits;
use crate::api::body::BodyRules;
use crate::api::head::HeadRules;
use crate::gateway::predlog::PredictionLogSettings;
use crate::server::{self, ServeOptions};
use crate::units::HumanDuration;

/// Serve machine-learning models and ship new versions of them into production safely.
#[derive(Parser, Debug)]
#[command(name = "ferry", version, about)]
pub struct Cli {
    /// The Ferry server to talk to.
    #[arg(
        long,
        global = true,
        env = "FERRY_SERVER",
        hide_env_values = true,
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// The admin token (default: FERRY_TOKEN, then ./ferry-data/admin-token).
    #[arg(long, global = true, env = "FERRY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Trust this PEM CA certificate (or bundle) for an https:// --server.
    #[arg(long, global = true, env = "FERRY_CA_CERT", hide_env_values = true)]
    pub ca_cert: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Human)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start the server.
    Serve(Box<ServeArgs>),
    /// Register, list, inspect, configure and remove model versions.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Start a rollout from flags.
    Deploy(Box<rollout::DeployArgs>),
    /// Start a rollout from a spec file (YAML or JSON); applying the active
    /// rollout's spec again changes nothing.
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Where rollouts stand (all models, or one).
    Status {
        model: Option<String>,
        /// Follow the rollout live until it ends; exit 0 if it succeeded,
        /// 1 if it was aborted, failed or rolled back, 2 on timeout.
        #[arg(long)]
        watch: bool,
        /// Stop watching after this long.
        #[arg(long, requires = "watch")]
        timeout: Option<HumanDuration>,
    },
    /// Advance past the current wait or step.
    Promote {
        model: String,
        /// Skip every remaining step.
        #[arg(long)]
        full: bool,
    },
    /// Pause the active rollout until `resume`.
    Pause { model: String },
    /// End a pause that waits for resume.
    Resume { model: String },
    /// Put all traffic back on the stable version at once.
    Abort { model: String },
    /// Start again with the spec of the last aborted or failed rollout.
    Retry { model: String },
    /// Switch production back to the previous stable version (or --to).
    Rollback {
        model: String,
        #[arg(long)]
        to: Option<String>,
    },
    /// A model's rollouts and events.
    History { model: String },
    /// The A/B comparison of a rollout's two arms.
    Report {
        model: String,
        rollout: Option<String>,
    },
    /// Send requests at a fixed rate and report what answered.
    Traffic(traffic::TrafficArgs),
    /// A guided live demo of all six strategies on the bundled example models.
    Demo(demo::DemoArgs),
    /// Work on a store directly (no server): copy one into another.
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// The instances sharing the server's store: live or stale, the route
    /// version each serves, their warm versions and load failures.
    Cluster,
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Read `serve` options from this YAML (or JSON) file: keys are the
    /// flags' names (`max_body_bytes: 1048576`, lists for repeatable flags);
    /// flags and their environment variables override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where the database, artifacts and admin token live.
    #[arg(long, default_value = "./ferry-data")]
    pub data_dir: PathBuf,
    /// The store: sqlite:PATH (default: the data dir's ferry.db), or
    /// postgres://USER@HOST:PORT/DB, shared by several instances (artifacts
    /// included; the data dir then caches them).
    #[arg(long, env = "FERRY_STORE", hide_env_values = true, value_name = "URL")]
    pub store: Option<String>,
    /// Keep artifacts in an S3-compatible bucket, s3://BUCKET/PREFIX, rather
    /// than in the store (endpoint, region and credentials from the AWS_*
    /// environment variables; the data dir caches them).
    #[arg(
        long,
        env = "FERRY_ARTIFACTS",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub artifacts: Option<String>,
    /// Address to listen on (port 0: any free port, printed at start-up).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// How other instances and the CLI reach this one, shown by `ferry
    /// cluster` (default: http(s)://the address bound).
    #[arg(long, value_name = "URL")]
    pub advertise_url: Option<String>,
    /// How long the leader's lease lasts (a shared store): a leader that
    /// dies is replaced within about this plus --leader-renew, and one cut
    /// off from the store stops leading within it.
    #[arg(
        long,
        env = "FERRY_LEADER_LEASE",
        hide_env_values = true,
        default_value = "3s"
    )]
    pub leader_lease: HumanDuration,
    /// How often the leader renews its lease, and the others try to take
    /// it (at most half of --leader-lease).
    #[arg(
        long,
        env = "FERRY_LEADER_RENEW",
        hide_env_values = true,
        default_value = "1s"
    )]
    pub leader_renew: HumanDuration,
    /// Address of the gRPC service (`inference.GRPCInferenceService`, the
    /// same models and routes as `/v2`; port 0: any free port), or `off`.
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub grpc_listen: server::GrpcListen,
    /// ONNX Runtime shared library (default: ORT_DYLIB_PATH, beside the binary, the build's copy).
    #[arg(long)]
    pub ort_library: Option<PathBuf>,
    /// Threads that accept and serve requests, each with its own event loop
    /// and upstream connections (0: one per core). Each replica has its own
    /// inference thread; models whose runs take under 100 µs run on these
    /// threads when their replica is idle.
    #[arg(long, default_value_t = 0)]
    pub io_threads: usize,
    /// Largest inference request body, in bytes; also the largest answer
    /// taken from a remote version.
    #[arg(long, default_value_t = Limits::default().max_body_bytes)]
    pub max_body_bytes: usize,
    /// Largest model upload, in bytes.
    #[arg(long, default_value_t = Limits::default().max_upload_bytes)]
    pub max_upload_bytes: usize,
    /// How long a version leaving the routes may take to finish its requests.
    #[arg(long, default_value = "30s")]
    pub drain_timeout: HumanDuration,
    /// How long a version's warm-up inference may run when it is registered
    /// or loaded; a model still running then is stopped and refused.
    #[arg(long, default_value = "60s")]
    pub load_timeout: HumanDuration,
    /// Recent request ids remembered for delayed labels (feedback).
    #[arg(long, default_value_t = 100_000)]
    pub remember_requests: usize,
    /// A client must send its request headers within this long (slow clients are disconnected).
    #[arg(long, default_value = "10s")]
    pub header_read_timeout: HumanDuration,
    /// Connections open at once; more are closed at once.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// Connections open at once from one peer address (0: half of
    /// --max-connections). Behind a load balancer, raise it to fit the
    /// balancer's connection pool.
    #[arg(long, default_value_t = 0)]
    pub max_connections_per_peer: usize,
    /// A client that pauses this long while sending a body is disconnected (408).
    #[arg(long, default_value = "10s")]
    pub body_read_timeout: HumanDuration,
    /// Slowest average body rate, in bytes/s, once --body-read-timeout has
    /// passed since the body started (0: no minimum).
    #[arg(long, default_value_t = BodyRules::default().min_rate)]
    pub body_min_rate: u64,
    /// Bytes of request bodies held in memory at once, across all
    /// connections; beyond it requests get 503 with Retry-After.
    #[arg(long, default_value_t = Limits::default().max_body_memory)]
    pub max_body_memory: usize,
    /// Host names accepted in the Host header besides loopback ones, for a
    /// server on a loopback address (DNS-rebinding defence); on another
    /// address, given names become the only ones accepted. Repeat or comma-separate.
    #[arg(long, value_delimiter = ',')]
    pub allow_host: Vec<String>,
    /// Web origins (scheme://host[:port]) whose browser requests are
    /// accepted; browser requests from other origins get 403. Repeat or comma-separate.
    #[arg(long, value_delimiter = ',')]
    pub allow_origin: Vec<String>,
    /// Feedback (delayed labels) takes this token too (read from the file,
    /// created mode 0600 when missing): hand it to a labelling job instead
    /// of the admin token.
    #[arg(long)]
    pub feedback_token_file: Option<PathBuf>,
    /// Require this token (read from the file, created mode 0600 when
    /// missing) on the data plane; health checks stay open.
    #[arg(long)]
    pub inference_token_file: Option<PathBuf>,
    /// Serve HTTPS (both the data plane and the control API) with this PEM
    /// certificate chain; needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Write a sample of requests and answers to this JSON Lines file.
    #[arg(long)]
    pub prediction_log: Option<PathBuf>,
    /// Fraction of requests written to the prediction log (0-1).
    #[arg(long, default_value_t = 0.01)]
    pub prediction_log_sample: f64,
    /// Size at which the prediction log is rotated to FILE.1, in bytes.
    #[arg(long, default_value_t = 100 << 20)]
    pub prediction_log_max_bytes: u64,
    /// Directory that QA datasets named by path in a spec (`qa.dataset`
    /// without its content) are read from; without it only datasets sent
    /// with the spec are used (as `ferry apply` and `ferry deploy` do).
    #[arg(long, env = "FERRY_QA_DIR", hide_env_values = true)]
    pub qa_dir: Option<PathBuf>,
    /// Hosts that notify webhooks, webhook checks and Prometheus checks may
    /// call, as HOST[:PORT],...; specs naming others are refused (default:
    /// any host).
    #[arg(
        long,
        env = "FERRY_ALLOW_OUTBOUND",
        hide_env_values = true,
        value_name = "HOST[:PORT],..."
    )]
    pub allow_outbound: Option<String>,
    /// Delete events older than this (never an active rollout's; rollouts
    /// themselves stay). Default: keep every event.
    #[arg(long, env = "FERRY_EVENT_RETENTION", hide_env_values = true)]
    pub event_retention: Option<HumanDuration>,
    /// With a shared store, how long a rollout command asked of an instance
    /// that does not lead waits for the leader to take it; then it is
    /// withdrawn (never executed) and answered 503.
    #[arg(long, default_value = "10s")]
    pub command_timeout: HumanDuration,
}

/// Prints a JSON answer (`-o json`) as the server sent it, indented.
pub fn print_json(v: &serde_json::Value) {
    outln!(
        "{}",
        serde_json::to_string_pretty(v).expect("JSON values serialise")
    );
}

/// Writes command output to stdout. A reader that has gone (EPIPE) ends the
/// process quietly with status 0; another write error ends it with a
/// message and status 1. Either way the process ends without unwinding, so
/// child processes registered with [`stop_on_early_exit`] are stopped first.
pub fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        drop(stdout);
        let code = if e.kind() == std::io::ErrorKind::BrokenPipe {
            0
        } else {
            eprintln!("error: cannot write the output: {e}");
            1
        };
        stop_children();
        std::process::exit(code);
    }
}

type Children = std::sync::Mutex<Vec<std::sync::Weak<std::sync::Mutex<std::process::Child>>>>;

/// Child processes a command runs (`ferry demo`'s servers), stopped when
/// output ends the command early.
static CHILDREN: Children = std::sync::Mutex::new(Vec::new());

/// Stops `child` if output ends the command early (its owner stops it
/// otherwise).
pub fn stop_on_early_exit(child: &std::sync::Arc<std::sync::Mutex<std::process::Child>>) {
    let mut children = CHILDREN.lock().unwrap_or_else(|p| p.into_inner());
    children.retain(|c| c.strong_count() > 0);
    children.push(std::sync::Arc::downgrade(child));
}

fn stop_children() {
    let children = std::mem::take(&mut *CHILDREN.lock().unwrap_or_else(|p| p.into_inner()));
    for child in children.iter().filter_map(std::sync::Weak::upgrade) {
        let mut child = child.lock().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Reads the command line (and `serve --config FILE`); prints what is wrong
/// and exits on a mistake.
pub fn parse() -> Cli {
    match config::parse_from(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(config::ArgsError::Clap(e)) => e.exit(),
        Err(config::ArgsError::Config(e)) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}

/// Runs the command line; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let output = cli.output;
    let client = || client::Client::new(&cli.server, cli.token.clone(), cli.ca_cert.as_deref());
    let ok = |r: anyhow::Result<()>| r.map(|()| ExitCode::SUCCESS);
    match cli.command {
        Command::Serve(args) => ok(server::serve(serve_options(*args)?).await),
        Command::Model(cmd) => ok(model::run(&client()?, cmd, output).await),
        Command::Deploy(args) => {
            let spec = rollout::deploy_spec(&args)?;
            rollout::send_spec(&client()?, &spec, output).await
        }
        Command::Apply { file } => rollout::apply(&client()?, &file, output).await,
        Command::Status {
            model,
            watch,
            timeout,
        } => rollout::status(&client()?, model.as_deref(), watch, timeout, output).await,
        Command::Promote { model, full } => ok(rollout::command(
            &client()?,
            &model,
            "promote",
            serde_json::json!({"full": full}),
            output,
        )
        .await),
        Command::Pause { model } => {
            ok(rollout::command(&client()?, &model, "pause", serde_json::json!({}), output).await)
        }
        Command::Resume { model } => {
            ok(rollout::command(&client()?, &model, "resume", serde_json::json!({}), output).await)
        }
        Command::Abort { model } => {
            ok(rollout::command(&client()?, &model, "abort", serde_json::json!({}), output).await)
        }
        Command::Retry { model } => {
            ok(rollout::command(&client()?, &model, "retry", serde_json::json!({}), output).await)
        }
        Command::Rollback { model, to } => ok(rollout::command(
            &client()?,
            &model,
            "rollback",
            serde_json::json!({"to": to}),
            output,
        )
        .await),
        Command::History { model } => ok(rollout::history(&client()?, &model, output).await),
        Command::Report { model, rollout: r } => {
            ok(rollout::report(&client()?, &model, r.as_deref(), output).await)
        }
        Command::Traffic(args) => traffic::run(&client()?, args, output).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Store(cmd) => ok(store::run(cmd, output).await),
        Command::Cluster => ok(cluster::run(&client()?, output).await),
    }
}

/// What `ferry serve`'s flags (and config file) ask of the server.
fn serve_options(args: ServeArgs) -> anyhow::Result<ServeOptions> {
    Ok(ServeOptions {
        store: server::store_url(args.store.as_deref())?,
        artifacts: server::bucket_url(args.artifacts.as_deref())?,
        data_dir: args.data_dir,
        listen: args.listen,
        io_threads: args.io_threads,
        grpc_listen: args.grpc_listen.0,
        ort_library: args.ort_library,
        limits: Limits {
            max_body_bytes: args.max_body_bytes,
            max_upload_bytes: args.max_upload_bytes,
            max_body_memory: args.max_body_memory,
            body: BodyRules {
                read_timeout: args.body_read_timeout.0,
                min_rate: args.body_min_rate,
            },
        },
        drain_timeout: args.drain_timeout.0,
        load_timeout: args.load_timeout.0,
        inference_token_file: args.inference_token_file,
        header_read_timeout: args.header_read_timeout.0,
        max_connections: args.max_connections,
        max_connections_per_peer: match args.max_connections_per_peer {
            0 => (args.max_connections / 2).max(1),
            n => n,
        },
        head: HeadRules {
            loopback: false, // set from the address actually bound
            allow_hosts: args.allow_host,
            allow_origins: args.allow_origin,
        },
        feedback_token_file: args.feedback_token_file,
        tls: args
            .tls_cert
            .zip(args.tls_key)
            .map(|(cert, key)| server::TlsFiles { cert, key }),
        remember_requests: args.remember_requests,
        prediction_log: args.prediction_log.map(|path| PredictionLogSettings {
            path,
            sample: args.prediction_log_sample,
            max_bytes: args.prediction_log_max_bytes,
        }),
        reach: server::reach(args.qa_dir, args.allow_outbound.as_deref())?,
        event_retention: server::event_retention(args.event_retention)?,
        advertise_url: server::advertise_url(args.advertise_url)?,
        leader: crate::store::LeaseSettings {
            lease: args.leader_lease.0,
            renew: args.leader_renew.0,
        }
        .validate()
        .map_err(|e| anyhow::anyhow!(e))?,
        command_timeout: server::command_timeout(args.command_timeout)?,
    })
}
