//! `ferry model ...`: the registry commands.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use super::Output;
use super::client::Client;
use super::table;
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
        /// A remote V2 endpoint: http[s]://host:port[/v2/models/NAME[/versions/V]] (one per replica).
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
    /// server reads the value from its environment or disk (repeatable).
    #[arg(long, value_name = "NAME=@env:VAR", requires = "url")]
    remote_header: Vec<String>,
}

impl RemoteArgs {
    fn to_json(&self) -> anyhow::Result<serde_json::Value> {
        let path = |p: &Option<PathBuf>| -> anyhow::Result<Option<String>> {
            p.as_ref()
                .map(|p| {
                    std::path::absolute(p)
                        .map(|p| p.display().to_string())
                        .with_context(|| format!("{}", p.display()))
                })
                .transpose()
        };
        let headers: Vec<String> = self
            .remote_header
            .iter()
            .map(|h| {
                // A file path is the server's; make a relative one absolute here.
                match h.split_once("=@file:") {
                    Some((name, p)) => std::path::absolute(p)
                        .map(|p| format!("{name}=@file:{}", p.display()))
                        .unwrap_or_else(|_| h.clone()),
                    None => h.clone(),
                }
            })
            .collect();
        let mut out = serde_json::Map::new();
        if let Some(p) = path(&self.remote_ca_cert)? {
            out.insert("ca_cert".into(), p.into());
        }
        if let Some(p) = path(&self.remote_client_cert)? {
            out.insert("client_cert".into(), p.into());
        }
        if let Some(p) = path(&self.remote_client_key)? {
            out.insert("client_key".into(), p.into());
        }
        if !headers.is_empty() {
            out.insert("headers".into(), headers.into());
        }
        Ok(out.into())
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
    fn to_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        if let Some(v) = self.replicas {
            m.insert("replicas".into(), json!(v));
        }
        if let Some(v) = self.threads {
            m.insert("threads".into(), json!(v));
        }
        if let Some(v) = self.queue {
            m.insert("queue".into(), json!(v));
        }
        if let Some(v) = self.timeout {
            m.insert("timeout".into(), json!(v.to_string()));
        }
        if let Some(v) = self.batch_max {
            m.insert("batch_max".into(), json!(v));
        }
        if let Some(v) = self.batch_delay {
            m.insert("batch_delay".into(), json!(v.to_string()));
        }
        Value::Object(m)
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label {s:?} must be key=value"))
}

fn print_json(v: &Value) {
    outln!(
        "{}",
        serde_json::to_string_pretty(v).expect("JSON values serialise")
    );
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
            let labels: BTreeMap<String, String> = labels.into_iter().collect();
            let spec = json!({"labels": labels, "settings": settings.to_json(), "urls": url, "remote": remote.to_json()?});
            let path = format!("/api/v1/models/{model}/versions/{version}");
            let rb = match &file {
                Some(f) => {
                    let bytes =
                        std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
                    let name = f
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let form = reqwest::multipart::Form::new()
                        .text("spec", spec.to_string())
                        .part(
                            "artifact",
                            reqwest::multipart::Part::bytes(bytes).file_name(name),
                        );
                    client.request(Method::PUT, &path).multipart(form)
                }
                None => client.request(Method::PUT, &path).json(&spec),
            };
            let (_, v): (_, Value) = client.send(rb).await?;
            if output == Output::Json {
                print_json(&v);
                return Ok(());
            }
            let what = source_text(&v["source"]);
            let serving = if v["role"] == "stable" {
                format!(
                    "it is the stable version of {model} and {}",
                    if v["serving"] == true {
                        "serves now"
                    } else {
                        "could not start (see the server log)"
                    }
                )
            } else {
                format!("the stable version of {model} is unchanged; roll it out with a deployment")
            };
            match v["result"].as_str() {
                Some("unchanged") => outln!(
                    "{model} {version} was already registered with this artifact ({what}); nothing changed"
                ),
                _ => outln!("registered {model} {version} ({what}); {serving}"),
            }
        }
        ModelCommand::Set {
            model,
            version,
            settings,
        } => {
            let body = settings.to_json();
            if body.as_object().is_some_and(|m| m.is_empty()) {
                anyhow::bail!(
                    "nothing to change: give --replicas, --threads, --queue, --timeout, --batch-max or --batch-delay"
                );
            }
            let path = format!("/api/v1/models/{model}/versions/{version}");
            let (_, v): (_, Value) = client
                .send(client.request(Method::PATCH, &path).json(&body))
                .await?;
            if output == Output::Json {
                print_json(&v);
            } else {
                outln!("{model} {version}: {}", settings_text(&v["settings"]));
            }
        }
        ModelCommand::List => {
            let (_, v): (_, Value) = client
                .send(client.request(Method::GET, "/api/v1/models"))
                .await?;
            if output == Output::Json {
                print_json(&v);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = v
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|m| {
                    vec![
                        str_of(&m["name"]),
                        str_of(&m["stable"]),
                        m["versions"]
                            .as_array()
                            .map(|a| a.iter().map(str_of).collect::<Vec<_>>().join(", "))
                            .unwrap_or_default(),
                        yes_no(&m["serving"]),
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
        }
        ModelCommand::Show { model } => {
            let (_, v): (_, Value) = client
                .send(client.request(Method::GET, &format!("/api/v1/models/{model}")))
                .await?;
            if output == Output::Json {
                print_json(&v);
                return Ok(());
            }
            show_model(&v);
        }
        ModelCommand::Remove { model, version } => {
            let path = format!("/api/v1/models/{model}/versions/{version}");
            client
                .send_raw(client.request(Method::DELETE, &path))
                .await?;
            if output == Output::Json {
                print_json(&json!({"removed": {"model": model, "version": version}}));
            } else {
                outln!("removed {model} {version}");
            }
        }
    }
    Ok(())
}

fn str_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn yes_no(v: &Value) -> String {
    if v == true { "yes".into() } else { "no".into() }
}

fn source_text(s: &Value) -> String {
    match s["kind"].as_str() {
        Some("onnx") => format!(
            "onnx sha256:{} {}",
            s["digest"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(12)
                .collect::<String>(),
            table::bytes(s["size"].as_u64().unwrap_or(0))
        ),
        Some("remote") => format!(
            "remote {}",
            s["endpoints"]
                .as_array()
                .map(|a| a.iter().map(str_of).collect::<Vec<_>>().join(", "))
                .unwrap_or_default()
        ),
        _ => "-".into(),
    }
}

fn settings_text(s: &Value) -> String {
    let batching = match s["batch_max"].as_u64() {
        Some(n) if n > 1 => format!(
            ", batches of up to {n} within {}",
            s["batch_delay"].as_str().unwrap_or("2ms")
        ),
        _ => String::new(),
    };
    format!(
        "replicas {}, threads {}, queue {}, timeout {}{batching}",
        str_of(&s["replicas"]),
        str_of(&s["threads"]),
        str_of(&s["queue"]),
        str_of(&s["timeout"])
    )
}

fn show_model(v: &Value) {
    outln!(
        "model {}  stable {}  created {}",
        str_of(&v["name"]),
        str_of(&v["stable"]),
        str_of(&v["created_at"])
    );
    let versions = v["versions"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let rows: Vec<Vec<String>> = versions
        .iter()
        .map(|x| {
            let labels = x["labels"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", str_of(v)))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            vec![
                str_of(&x["version"]),
                str_of(&x["role"]),
                yes_no(&x["serving"]),
                source_text(&x["source"]),
                settings_text(&x["settings"]),
                str_of(&x["created_at"]),
                if labels.is_empty() {
                    "-".into()
                } else {
                    labels
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
    let mut shown: Vec<&Value> = Vec::new();
    for x in versions {
        let sig = &x["signature"];
        if shown.contains(&sig) {
            continue;
        }
        shown.push(sig);
        let same: Vec<String> = versions
            .iter()
            .filter(|y| &y["signature"] == sig)
            .map(|y| str_of(&y["version"]))
            .collect();
        outln!("\nsignature of version {}:", same.join(", "));
        let mut rows = Vec::new();
        for (role, key) in [("input", "inputs"), ("output", "outputs")] {
            for t in sig[key].as_array().map(Vec::as_slice).unwrap_or_default() {
                rows.push(vec![
                    role.to_string(),
                    str_of(&t["name"]),
                    str_of(&t["datatype"]),
                    t["shape"].to_string(),
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
