//! `ferry model ...`: the registry commands.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use reqwest::Method;
use serde_json::json;

use super::client::Client;
use super::table::{self, cell};
use super::{Output, print_json};
use crate::api::control::{AddVersionResult, AddVersionSpec, ModelSummary, ModelView, VersionView};
use crate::protocol::signature::Signature;
use crate::records::{RemoteAccess, ServingSettings, SettingsPatch, Source};
use crate::units::HumanDuration;

#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Register a version: an ONNX file (--file) or remote V2 endpoints (--url, repeatable).
    Add {
        model: String,
        version: String,
        /// The ONNX model file.
        #[arg(long, conflicts_with = "url", required_unless_present = "url")]
        file: Option<PathBuf>,
        /// A remote V2 endpoint: http[s]://host:port[/v2/models/NAME[/versions/V]], or a gRPC server grpc://host:port[/NAME[/V]] (one per replica).
        #[arg(long)]
        url: Vec<String>,
        #[command(flatten)]
        remote: RemoteArgs,
        /// A label, key=value (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Change a version's serving settings.
    Set {
        model: String,
        version: String,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// List models.
    List,
    /// Show a model's versions: source, signature, settings, labels, whether they serve.
    Show { model: String },
    /// Remove a version that does not serve.
    Remove { model: String, version: String },
}

/// How the server reaches an https:// remote, and the headers it sends.
/// Files are read by the server (paths on its disk); header values come
/// from the server's environment or disk and are never stored or shown.
#[derive(clap::Args, Debug, Default)]
pub struct RemoteArgs {
    /// PEM CA certificate to trust for the remote instead of the system CAs.
    #[arg(long, value_name = "FILE", requires = "url")]
    remote_ca_cert: Option<PathBuf>,
    /// PEM client certificate for mutual TLS with the remote.
    #[arg(long, value_name = "FILE", requires_all = ["url", "remote_client_key"])]
    remote_client_cert: Option<PathBuf>,
    /// The PEM private key of --remote-client-cert.
    #[arg(long, value_name = "FILE", requires = "remote_client_cert")]
    remote_client_key: Option<PathBuf>,
    /// A header sent to the remote, NAME=@env:VAR or NAME=@file:PATH: the
    /// server reads the value from its environment or disk (repeatable). A
    /// `host` replaces the URL's; headers that frame the request
    /// (content-length, transfer-encoding, connection, content-type, ...)
    /// are Ferry's and refused.
    #[arg(long, value_name = "NAME=@env:VAR", requires = "url")]
    remote_header: Vec<String>,
}

impl RemoteArgs {
    /// The references the server reads; a relative path is made absolute
    /// here, since the path is the server's.
    fn access(&self) -> anyhow::Result<RemoteAccess> {
        let path = |p: &Option<PathBuf>| -> anyhow::Result<Option<String>> {
            p.as_ref()
                .map(|p| {
                    std::path::absolute(p)
                        .map(|p| p.display().to_string())
                        .with_context(|| format!("{}", p.display()))
                })
                .transpose()
        };
        let headers = self
            .remote_header
            .iter()
            .map(|h| match h.split_once("=@file:") {
                Some((name, p)) => std::path::absolute(p)
                    .map(|p| format!("{name}=@file:{}", p.display()))
                    .unwrap_or_else(|_| h.clone()),
                None => h.clone(),
            })
            .collect();
        Ok(RemoteAccess {
            ca_cert: path(&self.remote_ca_cert)?,
            client_cert: path(&self.remote_client_cert)?,
            client_key: path(&self.remote_client_key)?,
            headers,
        })
    }
}

#[derive(clap::Args, Debug, Default)]
pub struct SettingsArgs {
    /// ONNX Runtime sessions (each on its own thread).
    #[arg(long)]
    replicas: Option<u32>,
    /// Intra-op threads per session.
    #[arg(long)]
    threads: Option<u32>,
    /// Requests that may wait per replica before 503.
    #[arg(long)]
    queue: Option<u32>,
    /// Longest wait for an answer, e.g. 500ms, 2s.
    #[arg(long)]
    timeout: Option<HumanDuration>,
    /// Adaptive batching: merge up to N concurrent requests into one run (1: off).
    #[arg(long)]
    batch_max: Option<u32>,
    /// Adaptive batching: how long a request waits for others, e.g. 2ms.
    #[arg(long)]
    batch_delay: Option<HumanDuration>,
}

impl SettingsArgs {
    fn patch(&self) -> SettingsPatch {
        SettingsPatch {
            replicas: self.replicas,
            threads: self.threads,
            queue: self.queue,
            timeout: self.timeout,
            batch_max: self.batch_max,
            batch_delay: self.batch_delay,
        }
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label {s:?} must be key=value"))
}

/// Checks names before they go into a URL path (where `..` would be
/// normalised away), with the server's own rule and message.
fn check_names(model: &str, version: Option<&str>) -> anyhow::Result<()> {
    crate::records::check_name("model", model)?;
    if let Some(v) = version {
        crate::records::check_name("version", v)?;
    }
    Ok(())
}

pub async fn run(client: &Client, cmd: ModelCommand, output: Output) -> anyhow::Result<()> {
    match &cmd {
        ModelCommand::Add { model, version, .. }
        | ModelCommand::Set { model, version, .. }
        | ModelCommand::Remove { model, version } => check_names(model, Some(version))?,
        ModelCommand::Show { model } => check_names(model, None)?,
        ModelCommand::List => {}
    }
    match cmd {
        ModelCommand::Add {
            model,
            version,
            file,
            url,
            remote,
            labels,
            settings,
        } => {
            let spec = AddVersionSpec {
                urls: url,
                remote: remote.access()?,
                labels: labels.into_iter().collect(),
                settings: settings.patch(),
            };
            add(client, &model, &version, file.as_deref(), &spec, output).await
        }
        ModelCommand::Set {
            model,
            version,
            settings,
        } => set(client, &model, &version, &settings.patch(), output).await,
        ModelCommand::List => list(client, output).await,
        ModelCommand::Show { model } => {
            let path = format!("/api/v1/models/{model}");
            let (v, shown): (_, ModelView) = client
                .send_typed(client.request(Method::GET, &path))
                .await?;
            match output {
                Output::Json => print_json(&v),
                Output::Human => show_model(&shown),
            }
            Ok(())
        }
        ModelCommand::Remove { model, version } => {
            let path = format!("/api/v1/models/{model}/versions/{version}");
            client
                .send_raw(client.request(Method::DELETE, &path))
                .await?;
            match output {
                Output::Json => {
                    print_json(&json!({"removed": {"model": model, "version": version}}))
                }
                Output::Human => outln!("removed {model} {version}"),
            }
            Ok(())
        }
    }
}

/// `ferry model add`: an upload (multipart, the spec beside the file) or
/// remote endpoints (JSON).
async fn add(
    client: &Client,
    model: &str,
    version: &str,
    file: Option<&Path>,
    spec: &AddVersionSpec,
    output: Output,
) -> anyhow::Result<()> {
    let path = format!("/api/v1/models/{model}/versions/{version}");
    let rb = match file {
        Some(f) => {
            let bytes = std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let spec = serde_json::to_string(spec).expect("a version spec serialises");
            let form = reqwest::multipart::Form::new().text("spec", spec).part(
                "artifact",
                reqwest::multipart::Part::bytes(bytes).file_name(name),
            );
            client.request(Method::PUT, &path).multipart(form)
        }
        None => client.request(Method::PUT, &path).json(spec),
    };
    let (v, added): (_, AddVersionResult) = client.send_typed(rb).await?;
    if output == Output::Json {
        print_json(&v);
        return Ok(());
    }
    let view = &added.version;
    let what = source_text(&view.record.source);
    let serving = if view.role.as_deref() == Some("stable") {
        format!(
            "it is the stable version of {model} and {}",
            if view.serving {
                "serves now"
            } else {
                "could not start (see the server log)"
            }
        )
    } else {
        format!("the stable version of {model} is unchanged; roll it out with a deployment")
    };
    match added.result.as_str() {
        "unchanged" => outln!(
            "{model} {version} was already registered with this artifact ({what}); nothing changed"
        ),
        _ => outln!("registered {model} {version} ({what}); {serving}"),
    }
    Ok(())
}

/// `ferry model set`: a change to some serving settings.
async fn set(
    client: &Client,
    model: &str,
    version: &str,
    patch: &SettingsPatch,
    output: Output,
) -> anyhow::Result<()> {
    if *patch == SettingsPatch::default() {
        anyhow::bail!(
            "nothing to change: give --replicas, --threads, --queue, --timeout, --batch-max or --batch-delay"
        );
    }
    let path = format!("/api/v1/models/{model}/versions/{version}");
    let (v, view): (_, VersionView) = client
        .send_typed(client.request(Method::PATCH, &path).json(patch))
        .await?;
    match output {
        Output::Json => print_json(&v),
        Output::Human => outln!(
            "{model} {version}: {}",
            settings_text(&view.record.settings)
        ),
    }
    Ok(())
}

/// `ferry model list`.
async fn list(client: &Client, output: Output) -> anyhow::Result<()> {
    let (v, models): (_, Vec<ModelSummary>) = client
        .send_typed(client.request(Method::GET, "/api/v1/models"))
        .await?;
    if output == Output::Json {
        print_json(&v);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = models
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                cell(&m.stable),
                m.versions.join(", "),
                yes_no(m.serving),
            ]
        })
        .collect();
    if rows.is_empty() {
        outln!(
            "no models yet; register one with `ferry model add MODEL VERSION --file MODEL.onnx`"
        );
    } else {
        outln!(
            "{}",
            table::render(&["MODEL", "STABLE", "VERSIONS", "SERVING"], &rows)
        );
    }
    Ok(())
}

fn yes_no(b: bool) -> String {
    if b { "yes".into() } else { "no".into() }
}

fn source_text(s: &Source) -> String {
    match s {
        Source::Onnx { digest, size } => format!(
            "onnx sha256:{} {}",
            digest.chars().take(12).collect::<String>(),
            table::bytes(*size)
        ),
        Source::Remote { endpoints, .. } => format!("remote {}", endpoints.join(", ")),
    }
}

fn settings_text(s: &ServingSettings) -> String {
    let batching = match s.batch_max {
        n if n > 1 => format!(
            ", batches of up to {n} within {}",
            s.batch_delay.map_or("2ms".into(), |d| cell(&d))
        ),
        _ => String::new(),
    };
    format!(
        "replicas {}, threads {}, queue {}, timeout {}{batching}",
        s.replicas,
        s.threads,
        s.queue,
        cell(&s.timeout)
    )
}

fn show_model(m: &ModelView) {
    outln!(
        "model {}  stable {}  created {}",
        m.name,
        cell(&m.stable),
        m.created_at
    );
    let rows: Vec<Vec<String>> = m
        .versions
        .iter()
        .map(|x| {
            let r = &x.record;
            let labels: Vec<String> = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            vec![
                r.version.clone(),
                cell(&x.role),
                yes_no(x.serving),
                source_text(&r.source),
                settings_text(&r.settings),
                r.created_at.clone(),
                if labels.is_empty() {
                    "-".into()
                } else {
                    labels.join(",")
                },
            ]
        })
        .collect();
    outln!();
    outln!(
        "{}",
        table::render(
            &[
                "VERSION", "ROLE", "SERVING", "SOURCE", "SETTINGS", "ADDED", "LABELS"
            ],
            &rows
        )
    );
    show_signatures(&m.versions);
}

/// Each distinct signature once, naming the versions that have it.
fn show_signatures(versions: &[VersionView]) {
    let mut shown: Vec<&Signature> = Vec::new();
    for x in versions {
        let sig = &x.record.signature;
        if shown.contains(&sig) {
            continue;
        }
        shown.push(sig);
        let same: Vec<&str> = versions
            .iter()
            .filter(|y| &y.record.signature == sig)
            .map(|y| y.record.version.as_str())
            .collect();
        outln!("\nsignature of version {}:", same.join(", "));
        let mut rows = Vec::new();
        for (role, tensors) in [("input", &sig.inputs), ("output", &sig.outputs)] {
            for t in tensors {
                rows.push(vec![
                    role.to_string(),
                    t.name.clone(),
                    cell(&t.datatype),
                    serde_json::to_string(&t.shape).expect("a shape serialises"),
                ]);
            }
        }
        for line in table::render(&["", "NAME", "DATATYPE", "SHAPE"], &rows)
            .lines()
            .skip(1)
        {
            outln!("  {line}");
        }
    }
}
