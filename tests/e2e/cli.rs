//! The CLI as a newcomer meets it: what `deploy`, `traffic`, `rollback` and
//! `abort` print and how they exit, a closed pipe, and `--help`.

use std::process::{Command, Stdio};
use std::time::Duration;

use super::harness::{Server, example, ferry_binary};
use super::upstream::Upstream;

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A basic rollout ends before `deploy` gets its answer: deploy says how it
/// ended, and exits 1 when it failed (it printed "- started: -" and 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_of_an_instant_strategy_reports_the_outcome_and_fails_with_the_rollout() {
    let upstream = Upstream::start().await;
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    let out = s.ferry(&["deploy", "cancer", "2", "--strategy", "basic"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("r-1 (basic of cancer version 2): succeeded"),
        "{said}"
    );
    assert!(!said.contains("- started"), "{said}");

    s.ferry_json(&["model", "add", "cancer", "gone", "--url", &upstream.url]);
    upstream.set_failing(true); // its warm-up fails
    let out = s.ferry(&["deploy", "cancer", "gone", "--strategy", "basic"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("r-2 (basic of cancer version gone): failed"),
        "{said}"
    );
    assert!(said.contains("the stable version is 2"), "{said}");
}

/// `ferry model show cancer | head -1`: the reader is gone before the CLI
/// writes; it stops quietly instead of panicking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_pipe_ends_the_cli_quietly() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    for args in [
        &["model", "show", "cancer"][..],
        &["history", "cancer"],
        &["status", "cancer"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader); // as `head` does once it has its lines
        let out = s.cli(args).stdout(writer).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(out.status.success(), "{args:?}: {:?} {stderr}", out.status);
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}

/// Traffic to a model that does not exist: the server's reason, and exit 1
/// (it exited 0 with "errors 404: 11").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_that_never_succeeds_says_why_and_fails() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    let data = example("cancer-holdout.jsonl");
    let out = s.ferry(&[
        "traffic",
        "canser",
        "--rps",
        "20",
        "--duration",
        "1s",
        "--data",
        data.to_str().unwrap(),
    ]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("model \"canser\" is not served here"),
        "{said}"
    );
    assert!(said.contains("none of the"), "{said}");
    // Some succeeded: exit 0.
    let out = s.ferry(&[
        "traffic",
        "cancer",
        "--rps",
        "20",
        "--duration",
        "1s",
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
}

/// `deploy` of a misspelt model gets the hint `model show` gives, and the
/// name it was probably meant to be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_model_suggests_the_registered_name_and_how_to_add_it() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    for args in [
        &["deploy", "canser", "2", "--strategy", "basic"][..],
        &["model", "show", "canser"],
    ] {
        let out = s.ferry(args);
        let said = text(&out);
        assert!(!out.status.success(), "{said}");
        assert!(
            said.contains("did you mean \"cancer\"?"),
            "{args:?}: {said}"
        );
        assert!(
            said.contains("add it with `ferry model add canser VERSION --file MODEL.onnx`"),
            "{args:?}: {said}"
        );
    }
}

/// `ferry rollback` and `ferry abort` name the rollout once (they printed
/// "r-2: last rollout r-2: …").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_and_abort_name_the_rollout_once() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    s.ferry_ok(&["deploy", "cancer", "2", "--strategy", "basic"]);
    let said = s.ferry_ok(&["rollback", "cancer"]);
    assert_eq!(said.matches("r-2").count(), 1, "{said}");
    assert!(said.contains("version 1"), "{said}");
    s.deploy_canary("2", "10,100", "10m", &[]);
    let said = s.ferry_ok(&["abort", "cancer"]);
    assert_eq!(said.matches("r-3").count(), 1, "{said}");
    assert!(said.contains("aborted"), "{said}");
}

/// `--help` shows which variables are read, never an empty `NAME=` for an
/// unset one.
#[test]
fn help_names_environment_variables_without_empty_values() {
    for args in [&["--help"][..], &["serve", "--help"], &["deploy", "--help"]] {
        let out = Command::new(ferry_binary())
            .args(args)
            .env_remove("FERRY_SERVER")
            .env_remove("FERRY_CA_CERT")
            .env_remove("FERRY_QA_DIR")
            .env_remove("FERRY_ALLOW_OUTBOUND")
            .env_remove("FERRY_EVENT_RETENTION")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("[env: FERRY_"), "{args:?}: {help}");
        assert!(!help.contains("=]"), "{args:?}: {help}");
    }
}

/// The first start, in a terminal, prints a link that signs the dashboard
/// in; a later start, or one whose output goes to a pipe or a log, does not
/// show the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_start_in_a_terminal_prints_a_signed_in_dashboard_link() {
    let tmp = tempfile::tempdir().unwrap();
    let shown = tmp.path().join("shown");
    let piped = tmp.path().join("piped");
    let first = serve_until_listening(&shown, true);
    let token = std::fs::read_to_string(shown.join("admin-token")).unwrap();
    let url = first[0].trim_start_matches("ferry listening on ");
    let link = format!("{url}/ui/#token={}", token.trim());
    assert!(
        first.iter().any(|l| l.contains(&link)),
        "no {link} in {first:?}"
    );
    let again = serve_until_listening(&shown, true);
    assert!(
        !again.iter().any(|l| l.contains("#token=")),
        "the token is shown only when created: {again:?}"
    );
    let to_a_pipe = serve_until_listening(&piped, false);
    assert!(piped.join("admin-token").exists());
    assert!(
        !to_a_pipe.iter().any(|l| l.contains("#token=")),
        "the token went to a pipe: {to_a_pipe:?}"
    );
}

/// Starts `ferry serve` on `dir` — in a pseudo-terminal (util-linux
/// `script`) when `terminal` — and returns its stdout up to the line after
/// "ferry listening on …", then stops it.
fn serve_until_listening(dir: &std::path::Path, terminal: bool) -> Vec<String> {
    use std::io::BufRead;
    let serve = format!(
        "{} serve --listen 127.0.0.1:0 --data-dir {}",
        ferry_binary(),
        dir.display()
    );
    let mut command = if terminal {
        let mut c = Command::new("script");
        c.args(["-qefc", &serve, "/dev/null"]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", &format!("exec {serve}")]);
        c
    };
    let mut child = command
        .env("FERRY_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("util-linux script (for a pseudo-terminal) and sh");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line.trim_end_matches('\r').to_string());
        }
    });
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) {
        let listening = line.starts_with("ferry listening on ");
        if listening || !lines.is_empty() {
            lines.push(line);
        }
        if listening {
            // The link, when there is one, is in the same write.
            if let Ok(next) = rx.recv_timeout(Duration::from_millis(500)) {
                lines.push(next.trim_end_matches('\r').to_string());
            }
            break;
        }
    }
    assert!(!lines.is_empty(), "ferry serve did not start");
    // Killing `script` hangs up the terminal, which ends the server; `sh`
    // has become the server itself. Either way it stops listening.
    let _ = child.kill();
    let _ = child.wait();
    let addr = lines[0]
        .trim_start_matches("ferry listening on http://")
        .to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the server at {addr} did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    lines
}

/// `ferry demo | head -3`: the demo stops quietly once its reader has gone,
/// and takes its server with it (ending without unwinding left it running).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_pipe_stops_the_demo_and_its_server() {
    use std::io::BufRead;
    let mut demo = Command::new(ferry_binary())
        .args(["demo", "--fast"])
        .current_dir(super::harness::repo())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(demo.stdout.take().unwrap()).lines();
    let _title = lines.next().unwrap().unwrap();
    let server = lines.next().unwrap().unwrap();
    let url = server
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no server URL in {server:?}"))
        .to_string();
    drop(lines); // as `head` does
    // Its stderr stays open as long as a server it started runs.
    let status = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || demo.wait_with_output().unwrap()),
    )
    .await
    .expect("the demo and its servers end within 60 s of losing their reader")
    .unwrap();
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(status.status.success(), "{:?} {stderr}", status.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let http = reqwest::Client::new();
    let live = http.get(format!("{url}/v2/health/live")).send().await;
    assert!(live.is_err(), "the demo's server at {url} is still running");
}
