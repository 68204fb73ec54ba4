//! The docs cannot drift from the code: every rollout spec in the README and
//! `docs/` parses and validates, every `ferry serve --config` file is read
//! by the real CLI, every other YAML block parses, and every
//! `ferry` command line in a shell block parses with the real CLI.

use clap::Parser;

use super::harness::repo;

fn documents() -> Vec<(String, String)> {
    let mut out = vec![(
        "README.md".to_string(),
        std::fs::read_to_string(repo().join("README.md")).unwrap(),
    )];
    for e in std::fs::read_dir(repo().join("docs")).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "md") {
            out.push((
                p.display().to_string(),
                std::fs::read_to_string(&p).unwrap(),
            ));
        }
    }
    out
}

/// Fenced blocks of a language: (line number, content).
fn blocks(text: &str, lang: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let fence = line.trim_start();
        match current.take() {
            None if fence == format!("```{lang}") => current = Some((i + 1, String::new())),
            None => {}
            Some(block) if fence == "```" => out.push(block),
            Some((n, mut body)) => {
                body.push_str(line);
                body.push('\n');
                current = Some((n, body));
            }
        }
    }
    out
}

#[test]
fn every_yaml_example_in_the_docs_is_valid() {
    let mut specs = 0;
    for (doc, text) in documents() {
        for (line, block) in blocks(&text, "yaml") {
            if block.contains("ferry serve --config") {
                // A config file: every key is a `serve` option with a valid value.
                let tmp = tempfile::tempdir().unwrap();
                let file = tmp.path().join("ferry.yaml");
                std::fs::write(&file, &block).unwrap();
                let argv = vec![
                    "ferry".into(),
                    "serve".into(),
                    "--config".into(),
                    file.into(),
                ];
                if let Err(e) = ferry::cli::config::parse_from(argv) {
                    panic!("{doc}:{line}: {e:?}\n{block}");
                }
            } else if block.contains("strategy:") {
                ferry::spec::RolloutSpec::from_yaml(&block)
                    .unwrap_or_else(|e| panic!("{doc}:{line}: {e}\n{block}"));
                specs += 1;
            } else {
                yaml_serde::from_str::<yaml_serde::Value>(&block)
                    .unwrap_or_else(|e| panic!("{doc}:{line}: {e}"));
            }
        }
    }
    assert!(specs >= 8, "found only {specs} rollout specs in the docs");
}

/// Splits a shell line into words, honouring single and double quotes.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if !cur.is_empty() || any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (None, c) => cur.push(c),
        }
    }
    if !cur.is_empty() || any {
        out.push(cur);
    }
    out
}

#[test]
fn every_ferry_command_in_the_docs_parses() {
    let mut commands = 0;
    for (doc, text) in documents() {
        for (line, block) in blocks(&text, "sh") {
            let mut joined = String::new();
            for raw in block.lines() {
                // Continuation lines and comments.
                if let Some(stripped) = raw.strip_suffix('\\') {
                    joined.push_str(stripped);
                    continue;
                }
                joined.push_str(raw);
                let full = std::mem::take(&mut joined);
                let code = full.split(" # ").next().unwrap_or("").trim().to_string();
                for part in code.split(" | ") {
                    let part = part.trim().replace(['[', ']'], "");
                    let part = part
                        .strip_prefix("cargo run --release -- ")
                        .map(|rest| format!("ferry {rest}"))
                        .unwrap_or(part);
                    if !part.starts_with("ferry ") {
                        continue;
                    }
                    let args = words(&part);
                    ferry::cli::Cli::try_parse_from(&args)
                        .unwrap_or_else(|e| panic!("{doc}:{line}: `{part}` does not parse:\n{e}"));
                    commands += 1;
                }
            }
        }
    }
    assert!(
        commands >= 25,
        "found only {commands} ferry commands in the docs"
    );
}

/// The README's spec, which the tour applies with `ferry apply -f
/// examples/rollout.yaml`, is shipped and valid.
#[test]
fn the_tours_rollout_yaml_is_shipped_and_is_the_readmes_spec() {
    let path = repo().join("examples/rollout.yaml");
    let shipped =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let spec = ferry::spec::RolloutSpec::from_yaml(&shipped)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    spec.validate()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    assert!(readme.contains("ferry apply -f examples/rollout.yaml"));
    let in_readme = blocks(&readme, "yaml")
        .into_iter()
        .map(|(_, b)| b)
        .find(|b| b.contains("strategy:"))
        .expect("the README shows a spec");
    let readme_spec = ferry::spec::RolloutSpec::from_yaml(&in_readme).unwrap();
    assert_eq!(
        spec, readme_spec,
        "examples/rollout.yaml differs from the README's spec"
    );
}

/// The repository documents its own contract: no reference to a document it
/// does not ship, and every metric `/metrics` exports is in docs/reference.md.
#[test]
fn the_contract_is_documented_in_the_repository() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    assert!(!readme.contains("DESIGN.md"), "the README cites DESIGN.md");
    assert!(
        readme.contains("(docs/reference.md)"),
        "the README links the reference"
    );
    let reference = std::fs::read_to_string(repo().join("docs/reference.md")).unwrap();
    // Every family has a series once a version has served, failed over,
    // batched and been rolled out.
    let metrics = ferry::metrics::Metrics::new();
    metrics
        .for_version("m", "1")
        .record(ferry::metrics::Outcome::Ok, 0.001);
    metrics.failover("m", "1", "2");
    let _ = metrics.batch_sizes("m", "1");
    metrics.set_routing(
        "m",
        &[("1".into(), ferry::metrics::Role::Stable)],
        &[("1".into(), 100.0)],
    );
    metrics.set_rollout_phase("m", "canary", "progressing");
    let text = metrics.encode(ferry::metrics::Exposition::Text);
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    assert!(names.len() >= 9, "{names:?}");
    for name in names {
        assert!(
            reference.contains(&format!("`{name}")),
            "docs/reference.md does not document {name}"
        );
    }
    for field in [
        "min_requests",
        "failure_limit",
        "max_inconclusive",
        "confidence",
        "interval",
        "allow_signature_change",
        "notify",
        "sticky",
        "match",
        "scale_down_delay",
        "auto_promote_after",
        "mirror_percent",
        "min_comparisons",
        "min_agreement",
        "max_in_flight",
        "batch_size",
        "batch_pause",
        "max_unavailable",
        "keep",
    ] {
        assert!(
            reference.contains(&format!("`{field}`")),
            "docs/reference.md does not list the spec field {field}"
        );
    }
}

/// `deploy --help` and docs/strategies.md say the same of `max_unavailable`
/// (the help said "replicas that may be out of service at once"; the docs
/// say Ferry never goes below `replicas` ready).
#[test]
fn deploy_help_and_the_strategy_docs_agree_on_max_unavailable() {
    let strategies = std::fs::read_to_string(repo().join("docs/strategies.md")).unwrap();
    let row = strategies
        .lines()
        .find(|l| l.starts_with("| `max_unavailable`"))
        .expect("docs/strategies.md lists max_unavailable");
    assert!(row.contains("compatibility"), "{row}");
    let out = std::process::Command::new(super::harness::ferry_binary())
        .args(["deploy", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    let (_, flag) = help
        .split_once("--max-unavailable")
        .expect("deploy --help lists --max-unavailable");
    let flag = flag.split("\n      --").next().unwrap_or("");
    assert!(
        flag.contains("compatibility") && flag.contains("never"),
        "deploy --help: --max-unavailable{flag}"
    );
}
