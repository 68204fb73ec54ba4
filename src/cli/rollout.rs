//! The rollout commands: `deploy`, `apply`, `status [--watch]`, `promote`,
//! `pause`, `resume`, `abort`, `retry`, `rollback`, `history`, `report`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use reqwest::Method;
use serde_json::{Value, json};

use super::Output;
use super::client::Client;
use super::table;
use crate::spec::RolloutSpec;
use crate::units::HumanDuration;

#[derive(clap::Args, Debug)]
pub struct DeployArgs {
    pub model: String,
    pub version: String,
    /// basic, multi, rolling, canary, blue-green (or blue_green), shadow
    #[arg(long)]
    pub strategy: String,
    /// Canary weights in percent, e.g. 10,50,100.
    #[arg(long, value_delimiter = ',')]
    pub steps: Vec<f64>,
    /// Canary pause between weights, e.g. 30s.
    #[arg(long)]
    pub step_pause: Option<HumanDuration>,
    /// Canary: pin users by this header (e.g. x-user-id).
    #[arg(long)]
    pub sticky_header: Option<String>,
    /// Canary cohort rule, header=value[,value] (repeatable).
    #[arg(long = "match")]
    pub matches: Vec<String>,
    /// Multi: previous versions kept for failover.
    #[arg(long)]
    pub keep: Option<u32>,
    /// Multi: per-request timeout before failing over.
    #[arg(long)]
    pub timeout: Option<HumanDuration>,
    /// Rolling: pool size.
    #[arg(long)]
    pub replicas: Option<u32>,
    /// Rolling: replicas moved to the new version per batch.
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// Rolling: wait between batches (analysis runs meanwhile), e.g. 10s.
    #[arg(long)]
    pub batch_pause: Option<HumanDuration>,
    /// Rolling: kept for compatibility (must be below --replicas): new
    /// replicas are warm before they join, so Ferry never has fewer than
    /// --replicas ready, whatever this says.
    #[arg(long)]
    pub max_unavailable: Option<u32>,
    /// Blue-green: labelled JSON Lines run against green before promotion.
    #[arg(long)]
    pub qa_dataset: Option<PathBuf>,
    /// Blue-green: the output the QA run scores (class probabilities or labels).
    #[arg(long, default_value = "probabilities")]
    pub qa_output: String,
    /// Blue-green: accuracy on the QA data green needs (0-1).
    #[arg(long)]
    pub min_accuracy: Option<f64>,
    /// Blue-green: switch without waiting for `ferry promote`, after this long staged.
    #[arg(long)]
    pub auto_promote_after: Option<HumanDuration>,
    /// Blue-green: how long blue stays loaded after the switch (instant switch-back).
    #[arg(long)]
    pub scale_down_delay: Option<HumanDuration>,
    /// Shadow: percent of production requests mirrored.
    #[arg(long)]
    pub mirror_percent: Option<f64>,
    /// Shadow: the output compared between shadow and stable.
    #[arg(long)]
    pub compare_output: Option<String>,
    /// Shadow: comparisons needed before a verdict.
    #[arg(long)]
    pub min_comparisons: Option<u64>,
    /// Shadow: share of agreeing answers needed to pass (0-1).
    #[arg(long)]
    pub min_agreement: Option<f64>,
    /// Shadow: promote, manual or canary.
    #[arg(long)]
    pub then: Option<String>,
    /// Analysis: window length.
    #[arg(long)]
    pub interval: Option<HumanDuration>,
    /// Analysis: requests a window needs before it counts.
    #[arg(long)]
    pub min_requests: Option<u64>,
    /// Analysis check: error_rate max.
    #[arg(long)]
    pub max_error_rate: Option<f64>,
    /// Analysis check: latency_p99_ms max_vs_stable.
    #[arg(long)]
    pub max_p99_vs_stable: Option<f64>,
    /// Allow a candidate whose inputs or outputs differ from stable's.
    #[arg(long)]
    pub allow_signature_change: bool,
}

fn set(map: &mut serde_json::Map<String, Value>, key: &str, v: Option<Value>) {
    if let Some(v) = v {
        map.insert(key.to_string(), v);
    }
}

/// Builds the spec a `deploy` command describes.
pub fn deploy_spec(a: &DeployArgs) -> anyhow::Result<RolloutSpec> {
    let strategy = match a.strategy.as_str() {
        "basic" => json!({"basic": {}}),
        "multi" => {
            let mut m = serde_json::Map::new();
            set(&mut m, "keep", a.keep.map(|k| json!(k)));
            set(&mut m, "timeout", a.timeout.map(|t| json!(t.to_string())));
            json!({"multi": m})
        }
        "rolling" => {
            let mut m = serde_json::Map::new();
            set(
                &mut m,
                "replicas",
                Some(json!(
                    a.replicas.context("--replicas is required for rolling")?
                )),
            );
            set(&mut m, "batch_size", a.batch_size.map(|v| json!(v)));
            set(
                &mut m,
                "batch_pause",
                a.batch_pause.map(|v| json!(v.to_string())),
            );
            set(
                &mut m,
                "max_unavailable",
                a.max_unavailable.map(|v| json!(v)),
            );
            json!({"rolling": m})
        }
        "canary" => {
            if a.steps.is_empty() {
                anyhow::bail!(
                    "--steps is required for canary, e.g. --steps 10,50,100 --step-pause 30s"
                );
            }
            let mut steps = Vec::new();
            for (i, w) in a.steps.iter().enumerate() {
                steps.push(json!({"weight": w}));
                if let Some(p) = a.step_pause
                    && i + 1 < a.steps.len()
                {
                    steps.push(json!({"pause": p.to_string()}));
                }
            }
            let mut m = serde_json::Map::new();
            m.insert("steps".into(), json!(steps));
            set(
                &mut m,
                "sticky",
                a.sticky_header.as_ref().map(|h| json!({"header": h})),
            );
            let mut rules = Vec::new();
            for rule in &a.matches {
                let (header, values) = rule
                    .split_once('=')
                    .with_context(|| format!("--match {rule:?} must be header=value[,value]"))?;
                rules.push(
                    json!({"header": header, "values": values.split(',').collect::<Vec<_>>()}),
                );
            }
            if !rules.is_empty() {
                m.insert("match".into(), json!(rules));
            }
            json!({"canary": m})
        }
        "blue-green" | "blue_green" => {
            let mut m = serde_json::Map::new();
            if let Some(d) = &a.qa_dataset {
                m.insert(
                    "qa".into(),
                    json!({"dataset": d.display().to_string(), "output": a.qa_output, "min_accuracy": a.min_accuracy.unwrap_or(0.9)}),
                );
            }
            set(
                &mut m,
                "auto_promote_after",
                a.auto_promote_after.map(|v| json!(v.to_string())),
            );
            set(
                &mut m,
                "scale_down_delay",
                a.scale_down_delay.map(|v| json!(v.to_string())),
            );
            json!({"blue_green": m})
        }
        "shadow" => json!({"shadow": {
            "mirror_percent": a.mirror_percent.unwrap_or(100.0),
            "compare": {"output": a.compare_output.clone().unwrap_or_else(|| "probabilities".into())},
            "min_comparisons": a.min_comparisons.unwrap_or(500),
            "min_agreement": a.min_agreement.unwrap_or(0.98),
            "then": a.then.clone().unwrap_or_else(|| "promote".into()),
        }}),
        other => anyhow::bail!(
            "--strategy {other:?} is not one of basic, multi, rolling, canary, blue-green, shadow"
        ),
    };
    let mut spec = json!({
        "model": a.model, "version": a.version, "strategy": strategy,
        "allow_signature_change": a.allow_signature_change,
    });
    let mut checks = Vec::new();
    if let Some(m) = a.max_error_rate {
        checks.push(json!({"metric": "error_rate", "max": m}));
    }
    if let Some(r) = a.max_p99_vs_stable {
        checks.push(json!({"metric": "latency_p99_ms", "max_vs_stable": r}));
    }
    if !checks.is_empty() || a.interval.is_some() || a.min_requests.is_some() {
        let mut analysis = serde_json::Map::new();
        set(
            &mut analysis,
            "interval",
            a.interval.map(|i| json!(i.to_string())),
        );
        set(
            &mut analysis,
            "min_requests",
            a.min_requests.map(|n| json!(n)),
        );
        analysis.insert("checks".into(), json!(checks));
        spec["analysis"] = Value::Object(analysis);
    }
    let mut spec = RolloutSpec::from_yaml(&spec.to_string()).map_err(|e| anyhow::anyhow!(e))?;
    embed_qa_dataset(&mut spec, std::path::Path::new(""))?;
    Ok(spec)
}

fn print_json(v: &Value) {
    outln!(
        "{}",
        serde_json::to_string_pretty(v).expect("JSON values serialise")
    );
}

fn str_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Sends a spec; prints what happened. An instant strategy (basic, multi)
/// may have ended before the answer: then its outcome is printed and a
/// rollout that did not succeed exits 1, as `status --watch` does.
pub async fn send_spec(
    client: &Client,
    spec: &RolloutSpec,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let path = format!("/api/v1/models/{}/rollouts", spec.model);
    let (_, v): (_, Value) = client
        .send(client.request(Method::POST, &path).json(spec))
        .await?;
    let ended = v["rollout"].is_null();
    let outcome = if ended {
        v["last_rollout"]["phase"].as_str().unwrap_or("idle")
    } else {
        "started"
    };
    let code = match outcome {
        "started" | "succeeded" => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    };
    if output == Output::Json {
        print_json(&v);
    } else if v["result"] == "unchanged" {
        outln!(
            "{} is already rolling out this spec ({}); nothing changed",
            spec.model,
            str_of(&v["rollout"])
        );
    } else if ended {
        let last = &v["last_rollout"];
        outln!(
            "{} ({} of {} version {}): {}",
            str_of(&last["rollout"]),
            str_of(&last["strategy"]),
            spec.model,
            spec.version,
            str_of(&last["message"])
        );
        if outcome != "succeeded" {
            outln!(
                "see why with `ferry history {}`; the stable version is {}",
                spec.model,
                str_of(&v["stable"])
            );
        }
    } else {
        outln!(
            "{} started: {} of {} version {} (stable {})\n{}\nwatch it with `ferry status {} --watch`",
            str_of(&v["rollout"]),
            str_of(&v["strategy"]),
            spec.model,
            spec.version,
            str_of(&v["stable"]),
            str_of(&v["message"]),
            spec.model
        );
    }
    Ok(code)
}

/// Puts the QA dataset's content into the spec (its path is relative to
/// `base`), so the gate works against a remote server.
fn embed_qa_dataset(spec: &mut RolloutSpec, base: &std::path::Path) -> anyhow::Result<()> {
    if let crate::spec::Strategy::BlueGreen(b) = &mut spec.strategy
        && let Some(qa) = &mut b.qa
        && qa.content.is_none()
    {
        let path = base.join(&qa.dataset);
        qa.content = Some(std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read the QA dataset {} (qa.dataset is relative to the spec file)",
                path.display()
            )
        })?);
    }
    Ok(())
}

/// `ferry apply -f FILE`.
pub async fn apply(client: &Client, file: &PathBuf, output: Output) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut spec =
        RolloutSpec::from_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let base = file.parent().map(PathBuf::from).unwrap_or_default();
    embed_qa_dataset(&mut spec, &base)?;
    send_spec(client, &spec, output).await
}

/// The simple commands: promote, pause, resume, abort, retry, rollback.
pub async fn command(
    client: &Client,
    model: &str,
    action: &str,
    body: Value,
    output: Output,
) -> anyhow::Result<()> {
    crate::records::check_name("model", model)?;
    let path = format!("/api/v1/models/{model}/{action}");
    let (_, v): (_, Value) = client
        .send(client.request(Method::POST, &path).json(&body))
        .await?;
    if output == Output::Json {
        print_json(&v);
    } else {
        match (v["rollout"].as_str(), v["last_rollout"].as_object()) {
            (Some(r), _) => outln!("{r}: {}", str_of(&v["message"])),
            // Ended at once (abort, an instant rollback): the last rollout
            // says how, its id once.
            (None, Some(last)) => {
                outln!("{}: {}", str_of(&last["rollout"]), str_of(&last["message"]))
            }
            (None, None) => outln!("{model}: {}", str_of(&v["message"])),
        }
    }
    Ok(())
}

fn bar(traffic: &Value, width: usize) -> String {
    let Some(map) = traffic.as_object() else {
        return String::new();
    };
    let mut out = String::new();
    let marks = ['#', '=', '-', '.'];
    for (i, (_, share)) in map.iter().enumerate() {
        let n = (share.as_f64().unwrap_or(0.0) / 100.0 * width as f64).round() as usize;
        out.extend(std::iter::repeat_n(marks[i % marks.len()], n));
    }
    out.truncate(width);
    let legend: Vec<String> = map
        .iter()
        .enumerate()
        .map(|(i, (v, s))| {
            format!(
                "{} {v} {}%",
                marks[i % marks.len()],
                s.as_f64().unwrap_or(0.0)
            )
        })
        .collect();
    format!("[{out:<width$}]  {}", legend.join("  "))
}

fn render_status(v: &Value, events: &[Value]) -> String {
    let mut out = Vec::new();
    out.push(format!(
        "{}  stable {}  candidate {}  {}{}",
        str_of(&v["model"]),
        str_of(&v["stable"]),
        str_of(&v["candidate"]),
        str_of(&v["phase"]),
        v["waiting_for"]
            .as_str()
            .map_or(String::new(), |w| format!(" (waiting for {w})")),
    ));
    if let Some(r) = v["rollout"].as_str() {
        out.push(format!("rollout {r} ({})", str_of(&v["strategy"])));
    }
    if let Some(steps) = v["steps"].as_array().filter(|s| !s.is_empty()) {
        let current = v["step"].as_u64().unwrap_or(0) as usize;
        for (i, s) in steps.iter().enumerate() {
            let mark = match i.cmp(&current) {
                std::cmp::Ordering::Less => "  done ",
                std::cmp::Ordering::Equal => "  >>>  ",
                std::cmp::Ordering::Greater => "       ",
            };
            out.push(format!("{mark}{}. {}", i + 1, str_of(s)));
        }
    }
    out.push(format!("traffic   {}", bar(&v["traffic"], 40)));
    if v["observed"].as_object().is_some_and(|o| !o.is_empty()) {
        out.push(format!("observed  {}", bar(&v["observed"], 40)));
    }
    out.push(format!("message   {}", str_of(&v["message"])));
    if let Some(s) = v["staging"].as_str() {
        out.push(format!(
            "staging   version {s} (requests with x-ferry-env: staging)"
        ));
    }
    if let Some(q) = v["qa"].as_object() {
        out.push(format!("qa        {}", str_of(&q["reason"])));
    }
    if let Some(sh) = v["shadow"].as_object() {
        out.push(format!(
            "shadow    {} comparisons, agreement {}, {} disagreed, {} errors, {} dropped",
            str_of(&sh["comparisons"]),
            sh["agreement"]
                .as_f64()
                .map_or("-".into(), |a| format!("{a:.4}")),
            str_of(&sh["disagree"]),
            str_of(&sh["errors"]),
            str_of(&sh["dropped"])
        ));
        for e in sh["examples"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .take(3)
        {
            out.push(format!(
                "  disagreed on {}: production {} vs shadow {}",
                str_of(&e["id"]),
                e["primary"]["data"],
                e["shadow"]["data"]
            ));
        }
    }
    if let Some(a) = v["analysis"].as_object() {
        out.push(format!(
            "analysis  {} over {}: {} ({} candidate / {} stable requests)",
            str_of(&a["verdict"]),
            str_of(&a["window"]),
            str_of(&a["reason"]),
            str_of(&a["candidate_requests"]),
            str_of(&a["stable_requests"])
        ));
        let rows: Vec<Vec<String>> = a["checks"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|c| {
                let num = |x: &Value| x.as_f64().map_or("-".into(), |f| format!("{f:.4}"));
                vec![
                    str_of(&c["check"]),
                    str_of(&c["outcome"]),
                    num(&c["candidate"]),
                    num(&c["stable"]),
                    num(&c["p_value"]),
                ]
            })
            .collect();
        if !rows.is_empty() {
            for line in
                table::render(&["CHECK", "RESULT", "CANDIDATE", "STABLE", "P"], &rows).lines()
            {
                out.push(format!("  {line}"));
            }
        }
    }
    if !events.is_empty() {
        out.push("recent events".into());
        for e in events.iter().rev().take(6).rev() {
            out.push(format!("  {}  {}", str_of(&e["at"]), str_of(&e["message"])));
        }
    }
    out.join("\n")
}

async fn events_of(client: &Client, model: &str, rollout: Option<&str>) -> Vec<Value> {
    let Some(r) = rollout else { return vec![] };
    let path = format!("/api/v1/models/{model}/rollouts/{r}/events");
    client
        .send::<Value>(client.request(Method::GET, &path))
        .await
        .ok()
        .and_then(|(_, v)| v.as_array().cloned())
        .unwrap_or_default()
}

/// `ferry status [MODEL] [--watch [--timeout D]]`.
pub async fn status(
    client: &Client,
    model: Option<&str>,
    watch: bool,
    timeout: Option<HumanDuration>,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let Some(model) = model else {
        let (_, v): (_, Value) = client
            .send(client.request(Method::GET, "/api/v1/status"))
            .await?;
        if output == Output::Json {
            print_json(&v);
            return Ok(ExitCode::SUCCESS);
        }
        let rows: Vec<Vec<String>> = v
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|s| {
                let traffic = s["traffic"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| format!("{k}:{}%", v.as_f64().unwrap_or(0.0)))
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default();
                vec![
                    str_of(&s["model"]),
                    str_of(&s["stable"]),
                    str_of(&s["candidate"]),
                    str_of(&s["rollout"]),
                    str_of(&s["phase"]),
                    traffic,
                    str_of(&s["message"]),
                ]
            })
            .collect();
        outln!(
            "{}",
            table::render(
                &[
                    "MODEL",
                    "STABLE",
                    "CANDIDATE",
                    "ROLLOUT",
                    "PHASE",
                    "TRAFFIC",
                    "MESSAGE"
                ],
                &rows
            )
        );
        return Ok(ExitCode::SUCCESS);
    };
    crate::records::check_name("model", model)?;
    let path = format!("/api/v1/models/{model}/status");
    let started = Instant::now();
    let mut watched: Option<String> = None;
    let mut last_drawn = String::new();
    loop {
        let (_, v): (_, Value) = client.send(client.request(Method::GET, &path)).await?;
        if let Some(r) = v["rollout"].as_str() {
            watched = Some(r.to_string());
        }
        let shown = v["rollout"]
            .as_str()
            .map(str::to_string)
            .or_else(|| watched.clone());
        if !watch {
            if output == Output::Json {
                print_json(&v);
            } else {
                let events = events_of(client, model, shown.as_deref()).await;
                outln!("{}", render_status(&v, &events));
            }
            return Ok(ExitCode::SUCCESS);
        }
        let active = v["phase"] == "progressing" || v["phase"] == "paused";
        if output == Output::Human {
            let events = events_of(client, model, shown.as_deref()).await;
            let drawn = render_status(&v, &events);
            if drawn != last_drawn {
                if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                    out!("\x1b[2J\x1b[H");
                }
                outln!("{drawn}\n");
                last_drawn = drawn;
            }
        }
        if !active {
            // Ended (or nothing was running): the last rollout says how.
            let phase = v["last_rollout"]["phase"]
                .as_str()
                .unwrap_or("idle")
                .to_string();
            if output == Output::Json {
                print_json(&v);
            } else {
                outln!("{}: {}", str_of(&v["last_rollout"]["rollout"]), phase);
            }
            return Ok(match phase.as_str() {
                "succeeded" => ExitCode::SUCCESS,
                "idle" => ExitCode::SUCCESS,
                _ => ExitCode::from(1),
            });
        }
        if let Some(t) = timeout
            && started.elapsed() >= t.0
        {
            eprintln!(
                "timed out after {t} waiting for {} to end",
                shown.unwrap_or_default()
            );
            return Ok(ExitCode::from(2));
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
}

/// Every event at `path`, oldest first, page by page: the server answers
/// at most a page at a time and links the next one.
async fn all_events(client: &Client, path: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut next = Some(format!("{path}?after=0&limit=1000"));
    while let Some(page) = next.take() {
        let resp = client.send_raw(client.request(Method::GET, &page)).await?;
        next = resp
            .headers()
            .get(reqwest::header::LINK)
            .and_then(|l| l.to_str().ok())
            .and_then(next_link);
        let events: Vec<Value> = resp
            .json()
            .await
            .with_context(|| format!("the server's answer to {page} is not a list of events"))?;
        out.extend(events);
    }
    Ok(out)
}

/// The target of `<...>; rel="next"` in a Link header.
fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (target, params) = part.trim().split_once(';')?;
        params
            .split(';')
            .any(|p| p.trim() == "rel=\"next\"")
            .then(|| {
                target
                    .trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_string()
            })
    })
}

/// `ferry history MODEL`.
pub async fn history(client: &Client, model: &str, output: Output) -> anyhow::Result<()> {
    crate::records::check_name("model", model)?;
    let events = Value::Array(all_events(client, &format!("/api/v1/models/{model}/events")).await?);
    if output == Output::Json {
        print_json(&events);
        return Ok(());
    }
    let (_, rollouts): (_, Value) = client
        .send(client.request(Method::GET, &format!("/api/v1/models/{model}/rollouts")))
        .await?;
    let rows: Vec<Vec<String>> = rollouts
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|r| {
            vec![
                str_of(&r["rollout"]),
                str_of(&r["strategy"]),
                format!("{} -> {}", str_of(&r["from"]), str_of(&r["version"])),
                str_of(&r["phase"]),
                str_of(&r["created_at"]),
                str_of(&r["message"]),
            ]
        })
        .collect();
    if !rows.is_empty() {
        outln!(
            "{}\n",
            table::render(
                &[
                    "ROLLOUT", "STRATEGY", "VERSIONS", "PHASE", "STARTED", "MESSAGE"
                ],
                &rows
            )
        );
    }
    let rows: Vec<Vec<String>> = events
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|e| {
            vec![
                str_of(&e["at"]),
                str_of(&e["rollout"]),
                str_of(&e["kind"]),
                str_of(&e["message"]),
            ]
        })
        .collect();
    outln!(
        "{}",
        table::render(&["AT", "ROLLOUT", "KIND", "MESSAGE"], &rows)
    );
    Ok(())
}

/// `ferry report MODEL [ROLLOUT]`.
pub async fn report(
    client: &Client,
    model: &str,
    rollout: Option<&str>,
    output: Output,
) -> anyhow::Result<()> {
    crate::records::check_name("model", model)?;
    let mut rb = client.request(Method::GET, &format!("/api/v1/models/{model}/report"));
    if let Some(r) = rollout {
        rb = rb.query(&[("rollout", r)]);
    }
    let (_, v): (_, Value) = client.send(rb).await?;
    if output == Output::Json {
        print_json(&v);
        return Ok(());
    }
    let (s, c) = (&v["stable"], &v["candidate"]);
    let rate = |r: &Value| {
        if r.is_null() {
            "-".to_string()
        } else {
            format!(
                "{:.4} [{:.4}, {:.4}] ({}/{})",
                r["value"].as_f64().unwrap_or(0.0),
                r["low"].as_f64().unwrap_or(0.0),
                r["high"].as_f64().unwrap_or(0.0),
                str_of(&r["count"]),
                str_of(&r["of"])
            )
        }
    };
    let ms = |x: &Value| x.as_f64().map_or("-".into(), |f| format!("{f:.2} ms"));
    let diff = |metric: &str| {
        v["differences"]
            .as_array()
            .and_then(|d| d.iter().find(|x| x["metric"] == metric))
            .map(|d| {
                format!(
                    "{} (p={}){}",
                    d["difference"]
                        .as_f64()
                        .map_or("-".into(), |f| format!("{f:+.4}")),
                    d["p_value"]
                        .as_f64()
                        .map_or("-".into(), |p| format!("{p:.3}")),
                    if d["significant"] == true {
                        " significant"
                    } else {
                        ""
                    }
                )
            })
            .unwrap_or_default()
    };
    let classes = |x: &Value| {
        x["classes"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, n)| format!("{k}:{n}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    };
    outln!(
        "{} ({}, {}) — A/B report over {} s at {}% confidence\n",
        str_of(&v["rollout"]),
        str_of(&v["strategy"]),
        str_of(&v["phase"]),
        str_of(&v["seconds"]),
        v["confidence"].as_f64().unwrap_or(0.95) * 100.0
    );
    let rows = vec![
        vec![
            "requests".into(),
            str_of(&s["requests"]),
            str_of(&c["requests"]),
            String::new(),
        ],
        vec![
            "error rate".into(),
            rate(&s["error_rate"]),
            rate(&c["error_rate"]),
            diff("error_rate"),
        ],
        vec![
            "latency p50".into(),
            ms(&s["latency_p50_ms"]),
            ms(&c["latency_p50_ms"]),
            diff("latency_p50_ms"),
        ],
        vec![
            "latency p95".into(),
            ms(&s["latency_p95_ms"]),
            ms(&c["latency_p95_ms"]),
            String::new(),
        ],
        vec![
            "latency p99".into(),
            ms(&s["latency_p99_ms"]),
            ms(&c["latency_p99_ms"]),
            String::new(),
        ],
        vec![
            "accuracy".into(),
            rate(&s["accuracy"]),
            rate(&c["accuracy"]),
            diff("accuracy"),
        ],
        vec!["classes".into(), classes(s), classes(c), String::new()],
    ];
    let header_s = format!("STABLE {}", str_of(&s["version"]));
    let header_c = format!("CANDIDATE {}", str_of(&c["version"]));
    outln!(
        "{}",
        table::render(&["", &header_s, &header_c, "DIFFERENCE"], &rows)
    );
    if let Some(psi) = v["prediction_shift"].as_f64() {
        outln!("\nprediction shift (PSI of predicted classes): {psi:.4}");
    }
    Ok(())
}
