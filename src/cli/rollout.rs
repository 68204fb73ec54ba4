//! The rollout commands: `deploy`, `apply`, `status [--watch]`, `promote`,
//! `pause`, `resume`, `abort`, `retry`, `rollback`, `history`, `report`.
//! `deploy` builds a [`RolloutSpec`] from its flags (a flag left out keeps
//! the spec's own default, so the API and the CLI mean the same); the server
//! validates what it receives. Answers are decoded into the server's own
//! status and report types.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use reqwest::Method;
use serde::Deserialize;
use serde_json::Value;

use super::client::Client;
use super::table::{self, cell};
use super::{Output, print_json};
use crate::analysis::Outcome;
use crate::analysis::report::{Rate, Report};
use crate::api::rollouts::{ApplyResult, RolloutSummary};
use crate::controller::rollouts::{AnalysisView, Applied, Protocols, ShadowView, Status};
use crate::gateway::policy::MatchRule;
use crate::spec::{
    AnalysisSpec, BasicSpec, BlueGreenSpec, CanarySpec, CheckSpec, CompareSpec, Metric, MultiSpec,
    Pause, QaSpec, RollingScope, RollingSpec, RolloutSpec, ShadowSpec, ShadowThen, Step, Sticky,
    Strategy,
};
use crate::store::Event;
use crate::strategy::Phase;
use crate::units::HumanDuration;

/// The strategies `deploy` takes; a mistake gets clap's list of them.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StrategyName {
    Basic,
    Multi,
    Rolling,
    Canary,
    #[value(alias = "blue_green")]
    BlueGreen,
    Shadow,
}

#[derive(clap::Args, Debug)]
pub struct DeployArgs {
    pub model: String,
    pub version: String,
    /// The strategy (`blue_green` is accepted too).
    #[arg(long, value_enum)]
    pub strategy: StrategyName,
    /// Canary weights in percent, e.g. 10,50,100 (also the canary after a
    /// shadow's `--then canary`).
    #[arg(long, value_delimiter = ',')]
    pub steps: Vec<f64>,
    /// Canary pause between weights, e.g. 30s.
    #[arg(long)]
    pub step_pause: Option<HumanDuration>,
    /// Canary: pin users by this header (e.g. x-user-id).
    #[arg(long)]
    pub sticky_header: Option<String>,
    /// Canary cohort rule, header=value[,value] (repeatable).
    #[arg(long = "match", value_parser = parse_match)]
    pub matches: Vec<MatchRule>,
    /// Multi: previous versions kept for failover.
    #[arg(long)]
    pub keep: Option<u32>,
    /// Multi: per-request timeout before failing over.
    #[arg(long)]
    pub timeout: Option<HumanDuration>,
    /// Rolling: pool size.
    #[arg(long)]
    pub replicas: Option<u32>,
    /// Rolling: what a batch replaces, `replicas` of each instance's pool
    /// (the default) or whole `instances` sharing the store (then without
    /// --replicas).
    #[arg(long, value_parser = parse_scope)]
    pub scope: Option<RollingScope>,
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
    /// Blue-green: the output the QA run scores (class probabilities or
    /// labels; default probabilities).
    #[arg(long)]
    pub qa_output: Option<String>,
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
    /// Shadow: what follows enough agreement.
    #[arg(long, value_enum)]
    pub then: Option<ShadowThen>,
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

/// `--match header=value[,value]`.
fn parse_scope(scope: &str) -> Result<RollingScope, String> {
    match scope {
        "replicas" => Ok(RollingScope::Replicas),
        "instances" => Ok(RollingScope::Instances),
        other => Err(format!("{other:?} is not a scope: replicas or instances")),
    }
}

fn parse_match(rule: &str) -> Result<MatchRule, String> {
    let (header, values) = rule
        .split_once('=')
        .ok_or_else(|| format!("{rule:?} must be header=value[,value]"))?;
    Ok(MatchRule {
        header: header.to_string(),
        values: values.split(',').map(str::to_string).collect(),
    })
}

/// The spec a `deploy` command describes, with its QA dataset's content.
pub fn deploy_spec(a: &DeployArgs) -> anyhow::Result<RolloutSpec> {
    let mut spec = spec_of(a)?;
    embed_qa_dataset(&mut spec, Path::new(""))?;
    Ok(spec)
}

/// The spec the flags describe; what a flag leaves out is the spec's default.
fn spec_of(a: &DeployArgs) -> anyhow::Result<RolloutSpec> {
    Ok(RolloutSpec {
        model: a.model.clone(),
        version: a.version.clone(),
        allow_signature_change: a.allow_signature_change,
        strategy: strategy_of(a)?,
        analysis: analysis_of(a),
        notify: Vec::new(),
    })
}

/// A flag the strategy cannot do without.
fn required<T: Copy>(flag: Option<T>, name: &str, strategy: &str, e_g: &str) -> anyhow::Result<T> {
    flag.with_context(|| format!("{name} is required for {strategy}, e.g. {name} {e_g}"))
}

/// Each strategy's own flags, and the strategies that read them.
fn strategy_flags(a: &DeployArgs) -> [(bool, &'static str, &'static [StrategyName]); 24] {
    use StrategyName::{BlueGreen, Canary, Multi, Rolling, Shadow};
    // Basic and multi end before an analysis window could close.
    const JUDGED: &[StrategyName] = &[Canary, Rolling, BlueGreen, Shadow];
    [
        (a.interval.is_some(), "--interval", JUDGED),
        (a.min_requests.is_some(), "--min-requests", JUDGED),
        (a.max_error_rate.is_some(), "--max-error-rate", JUDGED),
        (a.max_p99_vs_stable.is_some(), "--max-p99-vs-stable", JUDGED),
        (!a.steps.is_empty(), "--steps", &[Canary, Shadow]),
        (a.step_pause.is_some(), "--step-pause", &[Canary, Shadow]),
        (
            a.sticky_header.is_some(),
            "--sticky-header",
            &[Canary, Shadow],
        ),
        (!a.matches.is_empty(), "--match", &[Canary, Shadow]),
        (a.keep.is_some(), "--keep", &[Multi]),
        (a.timeout.is_some(), "--timeout", &[Multi]),
        (a.replicas.is_some(), "--replicas", &[Rolling]),
        (a.scope.is_some(), "--scope", &[Rolling]),
        (a.batch_size.is_some(), "--batch-size", &[Rolling]),
        (a.batch_pause.is_some(), "--batch-pause", &[Rolling]),
        (a.max_unavailable.is_some(), "--max-unavailable", &[Rolling]),
        (a.qa_dataset.is_some(), "--qa-dataset", &[BlueGreen]),
        (a.qa_output.is_some(), "--qa-output", &[BlueGreen]),
        (a.min_accuracy.is_some(), "--min-accuracy", &[BlueGreen]),
        (
            a.auto_promote_after.is_some(),
            "--auto-promote-after",
            &[BlueGreen],
        ),
        (
            a.scale_down_delay.is_some(),
            "--scale-down-delay",
            &[BlueGreen],
        ),
        (a.mirror_percent.is_some(), "--mirror-percent", &[Shadow]),
        (a.compare_output.is_some(), "--compare-output", &[Shadow]),
        (a.min_comparisons.is_some(), "--min-comparisons", &[Shadow]),
        (a.min_agreement.is_some(), "--min-agreement", &[Shadow]),
    ]
}

/// A strategy's name as `--strategy` takes it.
fn flag_name(s: StrategyName) -> String {
    use clap::ValueEnum;
    s.to_possible_value()
        .map_or_else(|| format!("{s:?}"), |v| v.get_name().to_string())
}

fn strategy_of(a: &DeployArgs) -> anyhow::Result<Strategy> {
    // A flag of another strategy is refused rather than ignored: the user
    // meant it to change something.
    let not_read: Vec<(&str, &[StrategyName])> = strategy_flags(a)
        .into_iter()
        .filter(|(given, _, by)| *given && !by.contains(&a.strategy))
        .map(|(_, flag, by)| (flag, by))
        .collect();
    let strategy = flag_name(a.strategy);
    match not_read.as_slice() {
        [] => {}
        [(flag, by)] => {
            let by: Vec<String> = by.iter().map(|s| flag_name(*s)).collect();
            anyhow::bail!(
                "{flag} is not used by --strategy {strategy} (it is for --strategy {}): leave it out, or deploy with that strategy",
                by.join(" or ")
            );
        }
        many => {
            let named: Vec<String> = many
                .iter()
                .map(|(flag, by)| {
                    let by: Vec<String> = by.iter().map(|s| flag_name(*s)).collect();
                    format!("{flag} (for {})", by.join(" or "))
                })
                .collect();
            anyhow::bail!(
                "{} are not used by --strategy {strategy}: leave them out, or deploy with the strategy they are for",
                named.join(", ")
            );
        }
    }
    if a.then.is_some() && a.strategy != StrategyName::Shadow {
        anyhow::bail!(
            "--then is not used by --strategy {strategy} (it says what follows a shadow, --strategy shadow): leave it out, or deploy a shadow"
        );
    }
    Ok(match a.strategy {
        StrategyName::Basic => Strategy::Basic(BasicSpec {}),
        StrategyName::Multi => {
            let d = MultiSpec::default();
            Strategy::Multi(MultiSpec {
                keep: a.keep.unwrap_or(d.keep),
                timeout: a.timeout.or(d.timeout),
                ..d
            })
        }
        StrategyName::Rolling => {
            let d = match a.scope.unwrap_or_default() {
                RollingScope::Replicas => {
                    RollingSpec::new(required(a.replicas, "--replicas", "rolling", "4")?)
                }
                // The server refuses --replicas here, saying why.
                RollingScope::Instances => RollingSpec {
                    scope: RollingScope::Instances,
                    ..RollingSpec::new(a.replicas.unwrap_or(0))
                },
            };
            Strategy::Rolling(RollingSpec {
                batch_size: a.batch_size.unwrap_or(d.batch_size),
                batch_pause: a.batch_pause.unwrap_or(d.batch_pause),
                max_unavailable: a.max_unavailable.unwrap_or(d.max_unavailable),
                ..d
            })
        }
        StrategyName::Canary => Strategy::Canary(canary_of(a)?),
        StrategyName::BlueGreen => Strategy::BlueGreen(blue_green_of(a)?),
        StrategyName::Shadow => Strategy::Shadow(shadow_of(a)?),
    })
}

fn canary_of(a: &DeployArgs) -> anyhow::Result<CanarySpec> {
    if a.steps.is_empty() {
        anyhow::bail!("--steps is required for canary, e.g. --steps 10,50,100 --step-pause 30s");
    }
    let mut steps = Vec::new();
    for (i, w) in a.steps.iter().enumerate() {
        steps.push(Step::Weight(*w));
        if let Some(p) = a.step_pause
            && i + 1 < a.steps.len()
        {
            steps.push(Step::Pause(Pause::For(p)));
        }
    }
    Ok(CanarySpec {
        steps,
        sticky: a.sticky_header.clone().map(|header| Sticky { header }),
        matches: a.matches.clone(),
    })
}

fn blue_green_of(a: &DeployArgs) -> anyhow::Result<BlueGreenSpec> {
    let d = BlueGreenSpec::default();
    match (&a.qa_dataset, a.min_accuracy, &a.qa_output) {
        (Some(_), None, _) => anyhow::bail!(
            "--qa-dataset needs the accuracy green must reach on it, e.g. --min-accuracy 0.95"
        ),
        (None, Some(_), _) | (None, _, Some(_)) => anyhow::bail!(
            "--min-accuracy and --qa-output describe the QA run: give its labelled data with them, e.g. --qa-dataset examples/models/cancer-holdout.jsonl"
        ),
        _ => {}
    }
    let qa = a.qa_dataset.as_ref().map(|dataset| QaSpec {
        dataset: dataset.display().to_string(),
        content: None,
        output: (a.qa_output.as_deref())
            .unwrap_or(QaSpec::DEFAULT_OUTPUT)
            .to_string(),
        min_accuracy: a.min_accuracy,
        max_mean_abs_error: None,
    });
    Ok(BlueGreenSpec {
        qa: qa.or(d.qa),
        auto_promote_after: a.auto_promote_after.or(d.auto_promote_after),
        scale_down_delay: a.scale_down_delay.unwrap_or(d.scale_down_delay),
        ..d
    })
}

fn shadow_of(a: &DeployArgs) -> anyhow::Result<ShadowSpec> {
    let (
        Some(mirror_percent),
        Some(output),
        Some(min_comparisons),
        Some(min_agreement),
        Some(then),
    ) = (
        a.mirror_percent,
        a.compare_output.clone(),
        a.min_comparisons,
        a.min_agreement,
        a.then,
    )
    else {
        // Every missing flag at once, each with an example.
        let missing: Vec<(&str, &str)> = [
            (a.mirror_percent.is_none(), ("--mirror-percent", "100")),
            (
                a.compare_output.is_none(),
                ("--compare-output", "probabilities"),
            ),
            (a.min_comparisons.is_none(), ("--min-comparisons", "500")),
            (a.min_agreement.is_none(), ("--min-agreement", "0.98")),
            (a.then.is_none(), ("--then", "promote")),
        ]
        .into_iter()
        .filter_map(|(missing, flag)| missing.then_some(flag))
        .collect();
        let names: Vec<&str> = missing.iter().map(|(name, _)| *name).collect();
        let examples: Vec<String> = missing.iter().map(|(n, e)| format!("{n} {e}")).collect();
        anyhow::bail!(
            "{} {} required for shadow, e.g. {}",
            names.join(", "),
            if names.len() == 1 { "is" } else { "are" },
            examples.join(" ")
        );
    };
    let canary_flags = [
        (!a.steps.is_empty(), "--steps"),
        (a.step_pause.is_some(), "--step-pause"),
        (a.sticky_header.is_some(), "--sticky-header"),
        (!a.matches.is_empty(), "--match"),
    ];
    if then != ShadowThen::Canary
        && let Some((_, flag)) = canary_flags.iter().find(|(given, _)| *given)
    {
        anyhow::bail!(
            "{flag} describes the canary a shadow hands over to: it is used with --then canary only (this shadow is --then {})",
            match then {
                ShadowThen::Promote => "promote",
                _ => "manual",
            }
        );
    }
    Ok(ShadowSpec {
        mirror_percent,
        compare: CompareSpec::of(output),
        min_comparisons,
        min_agreement,
        then,
        canary: match then {
            ShadowThen::Canary => Some(canary_of(a)?),
            ShadowThen::Promote | ShadowThen::Manual => None,
        },
    })
}

/// The analysis block, when an analysis flag is given.
fn analysis_of(a: &DeployArgs) -> Option<AnalysisSpec> {
    let checks: Vec<CheckSpec> = [
        a.max_error_rate.map(|max| CheckSpec {
            metric: Some(Metric::ErrorRate),
            max: Some(max),
            ..CheckSpec::default()
        }),
        a.max_p99_vs_stable.map(|ratio| CheckSpec {
            metric: Some(Metric::LatencyP99Ms),
            max_vs_stable: Some(ratio),
            ..CheckSpec::default()
        }),
    ]
    .into_iter()
    .flatten()
    .collect();
    if checks.is_empty() && a.interval.is_none() && a.min_requests.is_none() {
        return None;
    }
    let d = AnalysisSpec::default();
    Some(AnalysisSpec {
        interval: a.interval.unwrap_or(d.interval),
        min_requests: a.min_requests.unwrap_or(d.min_requests),
        checks,
        ..d
    })
}

/// Sends a spec; prints what happened. An instant strategy (basic, multi)
/// may have ended before the answer: then its outcome is printed and a
/// rollout that did not succeed exits 1, as `status --watch` does.
pub async fn send_spec(
    client: &Client,
    spec: &RolloutSpec,
    output: Output,
) -> anyhow::Result<ExitCode> {
    crate::records::check_name("model", &spec.model)?;
    let path = format!("/api/v1/models/{}/rollouts", spec.model);
    let (v, answer): (_, ApplyResult) = client
        .send_typed(client.request(Method::POST, &path).json(spec))
        .await?;
    let st = &answer.status;
    let last = st.last_rollout.as_ref();
    let ended = st.rollout.is_none();
    let outcome = match last {
        _ if !ended => "started".to_string(),
        Some(l) => cell(&l.phase),
        None => "idle".to_string(),
    };
    let code = match outcome.as_str() {
        "started" | "succeeded" => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    };
    let (model, version) = (&spec.model, &spec.version);
    if output == Output::Json {
        print_json(&v);
    } else if answer.result == Applied::Unchanged {
        outln!(
            "{model} is already rolling out this spec ({}); nothing changed",
            cell(&st.rollout)
        );
    } else if ended {
        outln!(
            "{} ({} of {model} version {version}): {}",
            cell(&last.map(|l| &l.rollout)),
            cell(&last.map(|l| &l.strategy)),
            cell(&last.map(|l| &l.message))
        );
        if outcome != "succeeded" {
            outln!(
                "see why with `ferry history {model}`; the stable version is {}",
                cell(&st.stable)
            );
        }
    } else {
        outln!(
            "{} started: {} of {model} version {version} (stable {})\n{}\nwatch it with `ferry status {model} --watch`",
            cell(&st.rollout),
            cell(&st.strategy),
            cell(&st.stable),
            st.message,
        );
    }
    Ok(code)
}

/// Puts the QA dataset's content into the spec (its path is relative to
/// `base`), so the gate works against a remote server.
fn embed_qa_dataset(spec: &mut RolloutSpec, base: &Path) -> anyhow::Result<()> {
    if let Strategy::BlueGreen(b) = &mut spec.strategy
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

/// `ferry apply -f FILE`: the file is parsed here (to send its QA dataset
/// along) and validated by the server.
pub async fn apply(client: &Client, file: &PathBuf, output: Output) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut spec =
        RolloutSpec::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let base = file.parent().map(PathBuf::from).unwrap_or_default();
    embed_qa_dataset(&mut spec, &base)?;
    // The server validates what it receives; checking here too names the
    // file a mistake is in, before anything is sent.
    spec.validate()
        .map_err(|e| anyhow::anyhow!("{}: the spec is not valid: {e}", file.display()))?;
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
    let (v, st): (_, Status) = client
        .send_typed(client.request(Method::POST, &path).json(&body))
        .await?;
    if output == Output::Json {
        print_json(&v);
    } else {
        match (&st.rollout, &st.last_rollout) {
            (Some(r), _) => outln!("{r}: {}", st.message),
            // Ended at once (abort, an instant rollback): the last rollout
            // says how, its id once.
            (None, Some(last)) => outln!("{}: {}", last.rollout, last.message),
            (None, None) => outln!("{model}: {}", st.message),
        }
    }
    Ok(())
}

fn bar(traffic: &std::collections::BTreeMap<String, f64>, width: usize) -> String {
    let mut out = String::new();
    let marks = ['#', '=', '-', '.'];
    for (i, share) in traffic.values().enumerate() {
        let n = (share / 100.0 * width as f64).round() as usize;
        out.extend(std::iter::repeat_n(marks[i % marks.len()], n));
    }
    out.truncate(width);
    let legend: Vec<String> = traffic
        .iter()
        .enumerate()
        .map(|(i, (v, s))| format!("{} {v} {s}%", marks[i % marks.len()]))
        .collect();
    format!("[{out:<width$}]  {}", legend.join("  "))
}

fn render_status(s: &Status, events: &[Event]) -> String {
    let mut out = vec![format!(
        "{}  stable {}  candidate {}  {}{}",
        s.model,
        cell(&s.stable),
        cell(&s.candidate),
        cell(&s.phase),
        s.waiting_for
            .map_or(String::new(), |w| format!(" (waiting for {})", cell(&w))),
    )];
    if let Some(r) = &s.rollout {
        out.push(format!("rollout {r} ({})", cell(&s.strategy)));
    }
    let current = s.step.unwrap_or(0);
    for (i, step) in s.steps.iter().enumerate() {
        let mark = match i.cmp(&current) {
            std::cmp::Ordering::Less => "  done ",
            std::cmp::Ordering::Equal => "  >>>  ",
            std::cmp::Ordering::Greater => "       ",
        };
        out.push(format!("{mark}{}. {}", i + 1, cell(step)));
    }
    out.push(format!("traffic   {}", bar(&s.traffic, 40)));
    if !s.observed.is_empty() {
        out.push(format!("observed  {}", bar(&s.observed, 40)));
    }
    out.extend(protocols_line(&s.protocols));
    out.push(format!("message   {}", s.message));
    if let Some(v) = &s.staging {
        out.push(format!(
            "staging   version {v} (requests with x-ferry-env: staging)"
        ));
    }
    if let Some(q) = &s.qa {
        out.push(format!("qa        {}", q.reason));
    }
    if let Some(sh) = &s.shadow {
        out.extend(shadow_lines(sh));
    }
    if let Some(a) = &s.analysis {
        out.extend(analysis_lines(a));
    }
    if !events.is_empty() {
        out.push("recent events".into());
        for e in events.iter().rev().take(6).rev() {
            out.push(format!("  {}  {}", e.at, e.message));
        }
    }
    out.join("\n")
}

/// The recent requests by protocol, when there were any: `protocols 1.2k
/// requests in the last 10s, 70% REST, 30% gRPC`.
fn protocols_line(p: &Protocols) -> Option<String> {
    let total = p.rest + p.grpc;
    if total == 0 {
        return None;
    }
    let rest = (p.rest as f64 * 100.0 / total as f64).round() as u64;
    Some(format!(
        "protocols {} requests in the last {}, {rest}% REST, {}% gRPC",
        short_count(total),
        HumanDuration(Duration::from_secs(p.seconds)),
        100 - rest
    ))
}

/// A count as people glance at it: 950, 1.2k, 3.4M.
fn short_count(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.1}k", n as f64 / 1e3),
        _ => format!("{:.1}M", n as f64 / 1e6),
    }
}

fn shadow_lines(sh: &ShadowView) -> Vec<String> {
    let mut out = vec![format!(
        "shadow    {} comparisons, agreement {}, {} disagreed, {} errors, {} dropped",
        sh.comparisons,
        sh.agreement.map_or("-".into(), |a| format!("{a:.4}")),
        sh.disagree,
        sh.errors,
        sh.dropped
    )];
    for e in sh.examples.iter().take(3) {
        out.push(format!(
            "  disagreed on {}: production {} vs shadow {}",
            e.id, e.primary["data"], e.shadow["data"]
        ));
    }
    out
}

/// A verdict's figure, `-` when there is none.
fn figure(x: Option<f64>) -> String {
    x.map_or("-".into(), crate::analysis::figure)
}

/// The analysis line's reason: the verdict's own, unless it only repeats
/// what the table's WHY column says check by check; then how many checks
/// failed (or could not decide).
fn headline(a: &AnalysisView) -> String {
    let repeats = a.checks.iter().any(|c| a.reason.contains(&c.reason));
    if !repeats || a.verdict == Outcome::Pass {
        // The line already says the verdict.
        let reason = a.reason.strip_prefix("inconclusive: ").unwrap_or(&a.reason);
        return reason.to_string();
    }
    let n = a.checks.len();
    let k = a.checks.iter().filter(|c| c.outcome == a.verdict).count();
    let what = match (a.verdict == Outcome::Fail, k == 1) {
        (true, true) => "fails",
        (true, false) => "fail",
        (false, true) => "is inconclusive",
        (false, false) => "are inconclusive",
    };
    if n == 1 {
        format!("its check {what}")
    } else {
        format!("{k} of {n} checks {what}")
    }
}

fn analysis_lines(a: &AnalysisView) -> Vec<String> {
    let mut out = vec![format!(
        "analysis  {} over {}: {} ({} candidate / {} stable requests)",
        cell(&a.verdict),
        a.window,
        headline(a),
        a.candidate_requests,
        a.stable_requests
    )];
    let rows: Vec<Vec<String>> = a
        .checks
        .iter()
        .map(|c| {
            vec![
                c.check.clone(),
                cell(&c.outcome),
                figure(c.candidate),
                figure(c.stable),
                c.p_value.map_or("-".into(), crate::analysis::p_value),
                // Why: a check beyond its bound can still pass (not
                // significant, or under min_difference_ms).
                c.reason.clone(),
            ]
        })
        .collect();
    if !rows.is_empty() {
        let head = ["CHECK", "RESULT", "CANDIDATE", "STABLE", "P", "WHY"];
        for line in table::render(&head, &rows).lines() {
            out.push(format!("  {line}"));
        }
    }
    out
}

async fn events_of(client: &Client, model: &str, rollout: Option<&str>) -> Vec<Event> {
    let Some(r) = rollout else { return vec![] };
    let path = format!("/api/v1/models/{model}/rollouts/{r}/events");
    client
        .send::<Vec<Event>>(client.request(Method::GET, &path))
        .await
        .map(|(_, events)| events)
        .unwrap_or_default()
}

/// `ferry status` without a model: one row per model.
async fn status_of_all(client: &Client, output: Output) -> anyhow::Result<ExitCode> {
    let (v, all): (_, Vec<Status>) = client
        .send_typed(client.request(Method::GET, "/api/v1/status"))
        .await?;
    if output == Output::Json {
        print_json(&v);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|s| {
            let traffic: Vec<String> = s.traffic.iter().map(|(k, v)| format!("{k}:{v}%")).collect();
            vec![
                s.model.clone(),
                cell(&s.stable),
                cell(&s.candidate),
                cell(&s.rollout),
                cell(&s.phase),
                traffic.join(" "),
                s.message.clone(),
            ]
        })
        .collect();
    let header = [
        "MODEL",
        "STABLE",
        "CANDIDATE",
        "ROLLOUT",
        "PHASE",
        "TRAFFIC",
        "MESSAGE",
    ];
    outln!("{}", table::render(&header, &rows));
    if let Some(lines) = super::cluster::status_lines(client).await {
        outln!("{lines}");
    }
    Ok(ExitCode::SUCCESS)
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
        return status_of_all(client, output).await;
    };
    crate::records::check_name("model", model)?;
    let path = format!("/api/v1/models/{model}/status");
    let started = Instant::now();
    let mut watched: Option<String> = None;
    let mut last_drawn = String::new();
    loop {
        let (v, st): (_, Status) = client
            .send_typed(client.request(Method::GET, &path))
            .await?;
        if st.rollout.is_some() {
            watched.clone_from(&st.rollout);
        }
        // After the end, the events of the rollout that ended.
        let shown_rollout = st
            .rollout
            .clone()
            .or_else(|| watched.clone())
            .or_else(|| st.last_rollout.as_ref().map(|l| l.rollout.clone()));
        if !watch {
            if output == Output::Json {
                print_json(&v);
            } else {
                let events = events_of(client, model, shown_rollout.as_deref()).await;
                outln!("{}", render_status(&st, &events));
                if let Some(lines) = super::cluster::status_lines(client).await {
                    outln!("{lines}");
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        if output == Output::Human {
            let events = events_of(client, model, shown_rollout.as_deref()).await;
            let drawn = render_status(&st, &events);
            if drawn != last_drawn {
                if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                    out!("\x1b[2J\x1b[H");
                }
                outln!("{drawn}\n");
                last_drawn = drawn;
            }
        }
        if !matches!(cell(&st.phase).as_str(), "progressing" | "paused") {
            return Ok(watch_ended(&v, &st, output));
        }
        if let Some(t) = timeout
            && started.elapsed() >= t.0
        {
            eprintln!(
                "timed out after {t} waiting for {} to end",
                shown_rollout.unwrap_or_default()
            );
            return Ok(ExitCode::from(2));
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
}

/// The end of `status --watch` (or nothing was running): the last rollout
/// says how it ended, and the exit code with it.
fn watch_ended(v: &Value, st: &Status, output: Output) -> ExitCode {
    let last = st.last_rollout.as_ref();
    let phase = last.map_or("idle".to_string(), |l| cell(&l.phase));
    if output == Output::Json {
        print_json(v);
    } else {
        outln!("{}: {}", cell(&last.map(|l| &l.rollout)), phase);
    }
    match phase.as_str() {
        "succeeded" | "idle" => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
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
    let events = Vec::<Event>::deserialize(&events).context("the server's events")?;
    let (_, rollouts): (_, Vec<RolloutSummary>) = client
        .send_typed(client.request(Method::GET, &format!("/api/v1/models/{model}/rollouts")))
        .await?;
    let rows: Vec<Vec<String>> = rollouts
        .iter()
        .map(|r| {
            vec![
                r.rollout.clone(),
                cell(&r.strategy),
                format!("{} -> {}", r.from, r.version),
                cell(&r.phase),
                r.created_at.clone(),
                r.message.clone(),
            ]
        })
        .collect();
    if !rows.is_empty() {
        let header = [
            "ROLLOUT", "STRATEGY", "VERSIONS", "PHASE", "STARTED", "MESSAGE",
        ];
        outln!("{}\n", table::render(&header, &rows));
    }
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                e.at.clone(),
                cell(&e.rollout),
                cell(&e.kind),
                e.message.clone(),
            ]
        })
        .collect();
    outln!(
        "{}",
        table::render(&["AT", "ROLLOUT", "KIND", "MESSAGE"], &rows)
    );
    Ok(())
}

/// The report's heading: [`crate::api::rollouts::ReportView`] without its
/// flattened [`Report`], which serde cannot take flattened (its class counts
/// have integer keys); the report is decoded on its own.
#[derive(Deserialize)]
struct ReportHeading {
    rollout: String,
    strategy: String,
    phase: Phase,
}

/// `ferry report MODEL [ROLLOUT]`.
/// Why a report has no figures, when it has none: say so rather than
/// leave a table of dashes.
fn report_is_empty(report: &Report) -> Option<&'static str> {
    (report.stable.requests == 0 && report.candidate.requests == 0).then_some(
        "no requests counted yet for this rollout: traffic shows here within 5 s of reaching either version (the report counts 5-second buckets)",
    )
}

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
    let (v, heading): (_, ReportHeading) = client.send_typed(rb).await?;
    if output == Output::Json {
        print_json(&v);
        return Ok(());
    }
    let report = Report::deserialize(&v).context("the server's report")?;
    outln!(
        "{} ({}, {}) — A/B report over {} s at {}% confidence\n",
        heading.rollout,
        heading.strategy,
        cell(&heading.phase),
        report.seconds,
        report.confidence * 100.0
    );
    let header_s = format!("STABLE {}", report.stable.version);
    let header_c = format!("CANDIDATE {}", report.candidate.version);
    outln!(
        "{}",
        table::render(
            &["", &header_s, &header_c, "DIFFERENCE"],
            &report_rows(&report)
        )
    );
    if let Some(psi) = report.prediction_shift {
        outln!("\nprediction shift (PSI of predicted classes): {psi:.4}");
    }
    if let Some(why) = report_is_empty(&report) {
        outln!("\n{why}");
    }
    if let Some(short) = report.cluster.as_ref().and_then(|c| c.shortfall()) {
        outln!("\nmerged over the cluster's instances; {short}");
    }
    Ok(())
}

/// The report's table: one row per measure, stable, candidate, difference.
fn report_rows(r: &Report) -> Vec<Vec<String>> {
    let (s, c) = (&r.stable, &r.candidate);
    let rate = |x: &Option<Rate>| match x {
        None => "-".to_string(),
        Some(x) => format!(
            "{:.4} [{:.4}, {:.4}] ({}/{})",
            x.value, x.low, x.high, x.count, x.of
        ),
    };
    let ms = |x: Option<f64>| x.map_or("-".into(), |f| format!("{f:.2} ms"));
    let diff = |metric: &str| {
        r.differences
            .iter()
            .find(|d| d.metric == metric)
            .map(|d| {
                format!(
                    "{} ({}){}",
                    d.difference.map_or("-".into(), |f| format!("{f:+.4}")),
                    d.p_value.map_or("p=-".into(), crate::analysis::p_is),
                    if d.significant { " significant" } else { "" }
                )
            })
            .unwrap_or_default()
    };
    // Ordered by the class's text, as the report has always listed them.
    let classes = |x: &crate::analysis::report::Arm| {
        let mut counts: Vec<(String, u64)> =
            x.classes.iter().map(|(k, n)| (k.to_string(), *n)).collect();
        counts.sort();
        let counts: Vec<String> = counts.iter().map(|(k, n)| format!("{k}:{n}")).collect();
        counts.join(" ")
    };
    let row = |name: &str, s: String, c: String, d: String| vec![name.to_string(), s, c, d];
    vec![
        row(
            "requests",
            s.requests.to_string(),
            c.requests.to_string(),
            String::new(),
        ),
        row(
            "error rate",
            rate(&s.error_rate),
            rate(&c.error_rate),
            diff("error_rate"),
        ),
        row(
            "latency p50",
            ms(s.latency_p50_ms),
            ms(c.latency_p50_ms),
            diff("latency_p50_ms"),
        ),
        row(
            "latency p95",
            ms(s.latency_p95_ms),
            ms(c.latency_p95_ms),
            String::new(),
        ),
        row(
            "latency p99",
            ms(s.latency_p99_ms),
            ms(c.latency_p99_ms),
            String::new(),
        ),
        row(
            "accuracy",
            rate(&s.accuracy),
            rate(&c.accuracy),
            diff("accuracy"),
        ),
        row("classes", classes(s), classes(c), String::new()),
    ]
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    /// The spec `ferry deploy cancer 2 ARGS` builds (before its QA dataset
    /// is read).
    fn deployed(args: &str) -> anyhow::Result<RolloutSpec> {
        let argv = format!("ferry deploy cancer 2 {args}");
        let cli = Cli::try_parse_from(argv.split_whitespace()).unwrap();
        let Command::Deploy(a) = cli.command else {
            panic!("{argv} is not a deploy")
        };
        spec_of(&a)
    }

    /// What the control API makes of the same spec written out, leaving
    /// out what the flags leave out.
    fn parsed(strategy: &str) -> RolloutSpec {
        RolloutSpec::from_yaml(&format!("model: cancer\nversion: \"2\"\n{strategy}\n"))
            .unwrap_or_else(|e| panic!("{strategy}: {e}"))
    }

    /// Every strategy from flags is the spec a file or API request gives
    /// with the same fields: what the flags leave out takes the spec's
    /// defaults, never the CLI's own.
    #[test]
    fn flags_build_the_spec_a_file_with_the_same_fields_parses_to() {
        for (args, yaml) in [
            ("--strategy basic", "strategy: { basic: {} }"),
            ("--strategy multi", "strategy: { multi: {} }"),
            (
                "--strategy multi --keep 2 --timeout 500ms",
                "strategy: { multi: { keep: 2, timeout: 500ms } }",
            ),
            (
                "--strategy rolling --replicas 4",
                "strategy: { rolling: { replicas: 4 } }",
            ),
            (
                "--strategy rolling --replicas 4 --batch-size 2 --batch-pause 30s --max-unavailable 1",
                "strategy: { rolling: { replicas: 4, batch_size: 2, batch_pause: 30s, max_unavailable: 1 } }",
            ),
            (
                "--strategy rolling --scope instances --batch-size 2 --batch-pause 30s",
                "strategy: { rolling: { scope: instances, batch_size: 2, batch_pause: 30s } }",
            ),
            (
                "--strategy rolling --scope replicas --replicas 4",
                "strategy: { rolling: { replicas: 4 } }",
            ),
            (
                "--strategy canary --steps 10,50,100",
                "strategy: { canary: { steps: [ { weight: 10 }, { weight: 50 }, { weight: 100 } ] } }",
            ),
            (
                "--strategy canary --steps 10,100 --step-pause 30s --sticky-header x-user-id --match x-region=eu-west,eu-north",
                "strategy: { canary: { steps: [ { weight: 10 }, { pause: 30s }, { weight: 100 } ], sticky: { header: x-user-id }, match: [ { header: x-region, values: [eu-west, eu-north] } ] } }",
            ),
            ("--strategy blue-green", "strategy: { blue_green: {} }"),
            (
                "--strategy blue_green --qa-dataset holdout.jsonl --min-accuracy 0.95 --auto-promote-after 60s --scale-down-delay 10m",
                "strategy: { blue_green: { qa: { dataset: holdout.jsonl, min_accuracy: 0.95 }, auto_promote_after: 60s, scale_down_delay: 10m } }",
            ),
            (
                "--strategy shadow --mirror-percent 50 --compare-output label --min-comparisons 500 --min-agreement 0.98 --then promote",
                "strategy: { shadow: { mirror_percent: 50, compare: { output: label }, min_comparisons: 500, min_agreement: 0.98, then: promote } }",
            ),
            (
                "--strategy shadow --mirror-percent 100 --compare-output label --min-comparisons 5 --min-agreement 0.9 --then canary --steps 10,100",
                "strategy: { shadow: { mirror_percent: 100, compare: { output: label }, min_comparisons: 5, min_agreement: 0.9, then: canary, canary: { steps: [ { weight: 10 }, { weight: 100 } ] } } }",
            ),
            (
                "--strategy canary --steps 100 --max-error-rate 0.01",
                "strategy: { canary: { steps: [ { weight: 100 } ] } }\nanalysis: { checks: [ { metric: error_rate, max: 0.01 } ] }",
            ),
            (
                "--strategy canary --steps 100 --interval 30s --min-requests 10 --max-p99-vs-stable 1.5 --allow-signature-change",
                "strategy: { canary: { steps: [ { weight: 100 } ] } }\nallow_signature_change: true\nanalysis: { interval: 30s, min_requests: 10, checks: [ { metric: latency_p99_ms, max_vs_stable: 1.5 } ] }",
            ),
        ] {
            assert_eq!(deployed(args).unwrap(), parsed(yaml), "{args}");
        }
    }

    /// What a strategy cannot do without is asked for by flag, with an
    /// example; a strategy that does not exist gets clap's list.
    #[test]
    fn missing_flags_are_named_with_an_example() {
        for (args, needle) in [
            (
                "--strategy rolling",
                "--replicas is required for rolling, e.g. --replicas 4",
            ),
            (
                "--strategy canary",
                "--steps is required for canary, e.g. --steps 10,50,100",
            ),
            (
                "--strategy shadow --compare-output label --min-comparisons 5 --min-agreement 0.9 --then promote",
                "--mirror-percent is required for shadow",
            ),
            (
                "--strategy shadow --mirror-percent 100 --min-comparisons 5 --min-agreement 0.9 --then promote",
                "--compare-output is required for shadow",
            ),
            (
                "--strategy shadow --mirror-percent 100 --compare-output label --min-comparisons 5 --min-agreement 0.9 --then canary",
                "--steps is required for canary",
            ),
            (
                "--strategy shadow --mirror-percent 50",
                "--compare-output, --min-comparisons, --min-agreement, --then are required for shadow, e.g. --compare-output probabilities --min-comparisons 500 --min-agreement 0.98 --then promote",
            ),
            (
                "--strategy shadow --mirror-percent 100 --compare-output label --min-comparisons 5 --min-agreement 0.9 --then manual --steps 10,100",
                "--steps describes the canary a shadow hands over to: it is used with --then canary only (this shadow is --then manual)",
            ),
            (
                "--strategy shadow --mirror-percent 100 --compare-output label --min-comparisons 5 --min-agreement 0.9 --then promote --sticky-header x-user",
                "--sticky-header describes the canary",
            ),
            // Another strategy's flag is refused, not ignored.
            (
                "--strategy canary --steps 10,100 --keep 2",
                "--keep is not used by --strategy canary (it is for --strategy multi): leave it out, or deploy with that strategy",
            ),
            (
                "--strategy blue-green --steps 10 --replicas 3",
                "--steps (for canary or shadow), --replicas (for rolling) are not used by --strategy blue-green",
            ),
            (
                "--strategy basic --mirror-percent 10",
                "--mirror-percent is not used by --strategy basic (it is for --strategy shadow)",
            ),
            (
                "--strategy basic --max-error-rate 0.01",
                "--max-error-rate is not used by --strategy basic (it is for --strategy canary or rolling or blue-green or shadow)",
            ),
            (
                "--strategy multi --interval 5s",
                "--interval is not used by --strategy multi",
            ),
            (
                "--strategy rolling --replicas 4 --then promote",
                "--then is not used by --strategy rolling (it says what follows a shadow, --strategy shadow): leave it out",
            ),
            (
                "--strategy blue-green --qa-dataset d.jsonl",
                "--qa-dataset needs the accuracy green must reach on it, e.g. --min-accuracy 0.95",
            ),
            (
                "--strategy blue-green --min-accuracy 0.9",
                "give its labelled data with them, e.g. --qa-dataset",
            ),
            (
                "--strategy canary --steps 10,100 --qa-dataset d.jsonl",
                "--qa-dataset is not used by --strategy canary (it is for --strategy blue-green)",
            ),
        ] {
            let err = deployed(args).unwrap_err().to_string();
            assert!(err.contains(needle), "{args}: {err}");
        }
        for (args, needle) in [
            (
                "--strategy bogus",
                "possible values: basic, multi, rolling, canary, blue-green, shadow",
            ),
            (
                "--strategy canary --steps 10 --match x-region",
                "must be header=value[,value]",
            ),
            (
                "--strategy shadow --then later",
                "possible values: promote, manual, canary",
            ),
        ] {
            let argv = format!("ferry deploy cancer 2 {args}");
            let err = Cli::try_parse_from(argv.split_whitespace()).unwrap_err();
            assert!(err.to_string().contains(needle), "{args}: {err}");
        }
    }

    /// The status as people read it, from a status document as the server
    /// writes it (the lines the CLI has always printed, pinned).
    #[test]
    fn a_status_renders_its_steps_shares_shadow_and_analysis() {
        let status: Status = serde_json::from_value(serde_json::json!({
            "model": "cancer", "stable": "1", "candidate": "2", "rollout": "r-2",
            "strategy": "shadow", "phase": "paused", "waiting_for": "resume",
            "steps": ["mirroring", "decided"], "step": 1,
            "traffic": {"1": 100.0}, "observed": {"1": 97.5, "2": 2.5},
            "message": "paused", "analysis": {
                "verdict": "inconclusive", "window": "10s", "reason": "too few requests",
                "candidate_requests": 3, "stable_requests": 120, "consecutive_failures": 0,
                "consecutive_inconclusive": 2, "checks": [{"check": "error_rate max 0.01",
                    "outcome": "inconclusive", "candidate": 0.0, "stable": null, "p_value": null,
                    "reason": "3 requests < 50"}]},
            "updated_at": null, "last_rollout": null,
            "shadow": {"comparisons": 10, "agreement": 0.9, "disagree": 1, "errors": 0, "dropped": 2,
                "examples": [{"id": "a1", "primary": {"data": [0]}, "shadow": {"data": [1.5]}}]},
            "staging": "2"
        }))
        .unwrap();
        let events: Vec<Event> = serde_json::from_value(serde_json::json!([
            {"at": "2026-12-01T10:00:00Z", "model": "cancer", "rollout": "r-2", "kind": "paused",
             "message": "paused by you", "data": {}}
        ]))
        .unwrap();
        assert_eq!(
            render_status(&status, &events),
            "cancer  stable 1  candidate 2  paused (waiting for resume)
rollout r-2 (shadow)
  done 1. mirroring
  >>>  2. decided
traffic   [########################################]  # 1 100%
observed  [#######################################=]  # 1 97.5%  = 2 2.5%
message   paused
staging   version 2 (requests with x-ferry-env: staging)
shadow    10 comparisons, agreement 0.9000, 1 disagreed, 0 errors, 2 dropped
  disagreed on a1: production [0] vs shadow [1.5]
analysis  inconclusive over 10s: too few requests (3 candidate / 120 stable requests)
  CHECK                RESULT        CANDIDATE  STABLE  P  WHY
  error_rate max 0.01  inconclusive  0.0000     -       -  3 requests < 50
recent events
  2026-12-01T10:00:00Z  paused by you"
        );
    }

    /// A failing window says each figure once: the line counts the failed
    /// checks, the table gives each one's values and why; figures and
    /// p-values read as the verdict prints them.
    #[test]
    fn a_failing_window_says_each_figure_once() {
        let view = |verdict: &str, reason: &str| -> AnalysisView {
            serde_json::from_value(serde_json::json!({
                "verdict": verdict, "window": "10s", "reason": reason,
                "candidate_requests": 97, "stable_requests": 880,
                "consecutive_failures": 1, "consecutive_inconclusive": 0,
                "checks": [
                    {"check": "error_rate max 0.01", "outcome": "pass", "candidate": 0.0,
                     "stable": 0.0, "p_value": null, "reason": "candidate error_rate 0.0000 within 0.01"},
                    {"check": "latency_p99_ms max 1.5 x stable", "outcome": "fail",
                     "candidate": 45.2, "stable": 1.91, "p_value": 0.00001,
                     "reason": "candidate latency_p99_ms 45.20 > 1.5 x stable 1.91, p<0.001"}]
            }))
            .unwrap()
        };
        let failing = view(
            "fail",
            "candidate latency_p99_ms 45.20 > 1.5 x stable 1.91, p<0.001",
        );
        assert_eq!(
            analysis_lines(&failing).join("\n"),
            "analysis  fail over 10s: 1 of 2 checks fails (97 candidate / 880 stable requests)
  CHECK                            RESULT  CANDIDATE  STABLE  P       WHY
  error_rate max 0.01              pass    0.0000     0.0000  -       candidate error_rate 0.0000 within 0.01
  latency_p99_ms max 1.5 x stable  fail    45.20      1.91    <0.001  candidate latency_p99_ms 45.20 > 1.5 x stable 1.91, p<0.001"
        );
        // A reason no check gives (too few requests) is the line's own.
        let few = view(
            "inconclusive",
            "inconclusive: 7 candidate requests in the window, fewer than min_requests 50",
        );
        assert!(
            analysis_lines(&few)[0]
                .starts_with("analysis  inconclusive over 10s: 7 candidate requests in the window"),
            "the verdict is said once: {:?}",
            analysis_lines(&few)[0]
        );
        let mut one = failing.clone();
        one.checks.remove(0);
        assert!(analysis_lines(&one)[0].contains(": its check fails ("));
    }

    /// The protocol line says how many requests and how they split; no
    /// traffic, no line (and the rest of the status as it always was).
    #[test]
    fn a_status_splits_its_recent_requests_by_protocol() {
        let split = |rest, grpc| Protocols {
            seconds: 10,
            rest,
            grpc,
            versions: Default::default(),
        };
        assert_eq!(protocols_line(&split(0, 0)), None);
        assert_eq!(
            protocols_line(&split(840, 360)).as_deref(),
            Some("protocols 1.2k requests in the last 10s, 70% REST, 30% gRPC")
        );
        assert_eq!(
            protocols_line(&split(0, 7)).as_deref(),
            Some("protocols 7 requests in the last 10s, 0% REST, 100% gRPC")
        );
        assert_eq!(short_count(999), "999");
        assert_eq!(short_count(3_400_000), "3.4M");
        let status: Status = serde_json::from_value(serde_json::json!({
            "model": "cancer", "stable": "1", "candidate": null, "rollout": null,
            "strategy": null, "phase": "idle", "waiting_for": null, "steps": [], "step": null,
            "traffic": {"1": 100.0}, "observed": {"1": 100.0},
            "protocols": {"seconds": 10, "rest": 12, "grpc": 8,
                "versions": {"1": {"rest": 12, "grpc": 8}}},
            "message": "no rollout yet", "analysis": null, "updated_at": null, "last_rollout": null
        }))
        .unwrap();
        assert_eq!(
            render_status(&status, &[]),
            "cancer  stable 1  candidate -  idle
traffic   [########################################]  # 1 100%
observed  [########################################]  # 1 100%
protocols 20 requests in the last 10s, 60% REST, 40% gRPC
message   no rollout yet"
        );
    }

    /// The A/B table as people read it; classes listed by their text, as
    /// the report always listed them (10 before 2).
    #[test]
    fn a_report_renders_rates_latencies_differences_and_classes() {
        let arm = |version: &str, errors: u64| {
            serde_json::json!({"version": version, "requests": 200,
                "error_rate": {"value": errors as f64 / 200.0, "low": 0.0, "high": 0.05, "count": errors, "of": 200},
                "latency_p50_ms": 4.5, "latency_p95_ms": null, "latency_p99_ms": 9.25, "accuracy": null,
                "classes": {"2": 5, "10": 7}})
        };
        let report: Report = serde_json::from_value(serde_json::json!({
            "confidence": 0.95, "seconds": 60, "stable": arm("1", 0), "candidate": arm("2", 4),
            "differences": [{"metric": "error_rate", "difference": 0.02, "p_value": 0.0441, "significant": true}],
            "prediction_shift": null
        }))
        .unwrap();
        let rows = report_rows(&report);
        assert_eq!(
            table::render(&["", "STABLE 1", "CANDIDATE 2", "DIFFERENCE"], &rows),
            "             STABLE 1                         CANDIDATE 2                      DIFFERENCE
requests     200                              200
error rate   0.0000 [0.0000, 0.0500] (0/200)  0.0200 [0.0000, 0.0500] (4/200)  +0.0200 (p=0.044) significant
latency p50  4.50 ms                          4.50 ms
latency p95  -                                -
latency p99  9.25 ms                          9.25 ms
accuracy     -                                -
classes      10:7 2:5                         10:7 2:5"
        );
        assert_eq!(report_is_empty(&report), None);
        // Before a window has closed, the report says why it is empty.
        let mut early = report.clone();
        (early.stable.requests, early.candidate.requests) = (0, 0);
        assert!(report_is_empty(&early).unwrap().contains("within 5 s"));
    }

    #[test]
    fn a_qa_dataset_is_read_relative_to_the_spec_and_sent_with_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("qa.jsonl"), "{\"label\": 1}\n").unwrap();
        let mut spec =
            deployed("--strategy blue-green --qa-dataset qa.jsonl --min-accuracy 0.9").unwrap();
        embed_qa_dataset(&mut spec, dir.path()).unwrap();
        let Strategy::BlueGreen(b) = &spec.strategy else {
            panic!("blue-green")
        };
        assert_eq!(
            b.qa.as_ref().unwrap().content.as_deref(),
            Some("{\"label\": 1}\n")
        );
        let mut spec =
            deployed("--strategy blue-green --qa-dataset gone.jsonl --min-accuracy 0.9").unwrap();
        let err = embed_qa_dataset(&mut spec, dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("cannot read the QA dataset"),
            "{err}"
        );
    }
}
