//! `ferry demo` from an installed binary: no checkout, no example files.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::harness::ferry_binary;

/// The binary copied to an empty directory (as `cargo install` or a container
/// image would put it) runs the whole fast demo from there: the example
/// models and hold-out set come from the binary itself.
#[test]
fn the_demo_runs_from_an_installed_binary_outside_a_checkout() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("ferry");
    std::fs::copy(ferry_binary(), &exe).unwrap();
    let mut child = Command::new(&exe)
        .args(["demo", "--fast"])
        .current_dir(dir.path())
        .env("TMPDIR", dir.path())
        .env_remove("FERRY_TOKEN")
        .env_remove("FERRY_SERVER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("ferry demo --fast did not finish in 5 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        status.success(),
        "the demo failed outside a checkout:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("[7/7]"), "{stdout}");
}
