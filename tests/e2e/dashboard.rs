//! The dashboard in a real browser: Debian's Chromium driven by
//! `playwright-core` from npm (never a downloaded browser). The test
//! provisions both when they are missing (npm into the target dir; Chromium
//! with apt-get, which needs root — CI runs as root). On a cluster the page
//! says whether its figures hold every instance's, and marks them
//! incomplete while an instance is frozen.

use std::path::PathBuf;
use std::process::Command;

use serde_json::json;

use super::harness::{Server, Traffic, repo};
use super::outage::Cluster;
use super::testpg;

const PLAYWRIGHT: &str = "playwright-core@1.65.1";

fn target() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
}

/// A node_modules with playwright-core, made once. The browser tests run
/// concurrently: the first installs while the others wait (two `npm
/// install`s in one directory fail each other, as a CI run showed).
fn node_modules() -> PathBuf {
    static MADE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    MADE.get_or_init(install_node_modules).clone()
}

fn install_node_modules() -> PathBuf {
    let dir = target().join("test-node");
    if dir
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        return dir;
    }
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("package.json"),
        r#"{"name": "ferry-browser-tests", "private": true, "type": "module"}"#,
    )
    .unwrap();
    let ok = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--silent", PLAYWRIGHT])
        .current_dir(&dir)
        .status();
    assert!(
        ok.is_ok_and(|s| s.success()),
        "this test needs Node.js with npm to install {PLAYWRIGHT}"
    );
    dir
}

/// The module every browser script starts Chromium with, beside them.
fn copy_launch(dir: &std::path::Path) {
    std::fs::copy(
        repo().join("tests/browser/launch.mjs"),
        dir.join("launch.mjs"),
    )
    .unwrap();
}

/// Debian's Chromium, installed when missing (as root).
fn chromium() -> PathBuf {
    let path =
        PathBuf::from(std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    if !path.exists() {
        let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        let _ = Command::new("apt-get")
            .args(["install", "-y", "-qq", "chromium"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
    }
    assert!(
        path.exists(),
        "this test needs Debian's chromium (apt-get install chromium) at {}",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_and_steers_a_canary_in_a_real_browser() {
    let (modules, browser) = tokio::task::spawn_blocking(|| (node_modules(), chromium()))
        .await
        .unwrap();
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    let traffic = Traffic::start(&s, 50, 2);
    let spec = json!({
        "model": "cancer", "version": "2",
        "strategy": {"canary": {"steps": [{"weight": 10}, {"pause": {}}, {"weight": 50}, {"pause": {}}, {"weight": 100}], "sticky": {"header": "x-user-id"}}},
        "analysis": {"interval": "5s", "min_requests": 5, "checks": [{"metric": "error_rate", "max": 0.05}]}
    });
    s.start_rollout(&spec).await;
    let shots = target().join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let script = repo().join("tests/browser/dashboard.mjs");
    let run_dir = modules.clone();
    std::fs::copy(&script, run_dir.join("dashboard.mjs")).unwrap();
    copy_launch(&run_dir);
    let (url, token, shots_dir) = (s.url.clone(), s.token(), shots.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("dashboard.mjs")
            .current_dir(&run_dir)
            .env("FERRY_URL", url)
            .env("FERRY_TOKEN", token)
            .env("CHROMIUM", browser)
            .env("SCREENSHOTS", shots_dir)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    traffic.finish().await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("dashboard OK"),
        "browser test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(shots.join("dashboard.png").exists());
    let st = s.admin_get("/api/v1/models/cancer/status").await;
    assert_eq!(
        st["last_rollout"]["phase"], "aborted",
        "the page's Abort reached the server"
    );
}

/// Two instances on one PostgreSQL, traffic on both; the page of B says
/// its figures are merged over both, marks them incomplete while A is
/// frozen (SIGSTOP), and complete again once A flushed (SIGCONT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_marks_figures_incomplete_while_an_instance_is_frozen() {
    use std::io::BufRead;
    let (modules, browser) = tokio::task::spawn_blocking(|| (node_modules(), chromium()))
        .await
        .unwrap();
    let url = testpg::database();
    let cluster = Cluster::start_serving_cancer(&url, 2).await;
    let [a, b] = &cluster.instances[..] else {
        unreachable!()
    };
    let load = [Traffic::start(a, 20, 1), Traffic::start(b, 20, 1)];
    let shots = target().join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    std::fs::copy(
        repo().join("tests/browser/cluster.mjs"),
        modules.join("cluster.mjs"),
    )
    .unwrap();
    copy_launch(&modules);
    let mut child = Command::new("node")
        .arg("cluster.mjs")
        .current_dir(&modules)
        .env("FERRY_URL", &b.url)
        .env("FERRY_TOKEN", b.token())
        .env("CHROMIUM", browser)
        .env("SCREENSHOTS", &shots)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let mut said = Vec::new();
    while let Some(line) = rx.recv().await {
        if line == "complete seen" {
            a.signal("-STOP");
        }
        if line.starts_with("incomplete seen") {
            a.signal("-CONT");
        }
        said.push(line);
    }
    a.signal("-CONT");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    for l in load {
        l.finish().await;
    }
    assert!(
        status.success() && said.iter().any(|l| l == "dashboard cluster OK"),
        "browser test failed:\n{}",
        said.join("\n")
    );
    assert!(shots.join("dashboard-incomplete.png").exists());
}
