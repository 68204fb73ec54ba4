//! `ferry serve --config FILE`: serve options from a file, flags over it.

use std::process::Command;

use super::harness::{Server, batch, ferry_binary};

#[tokio::test]
async fn serve_takes_its_options_from_a_config_file_and_flags_override_it() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("ferry.yaml");
    let elsewhere = tmp.path().join("not-this-dir");
    std::fs::write(
        &config,
        format!(
            "# options of `ferry serve`, named as the flags\n\
             data_dir: {}\n\
             max-body-bytes: 4096\n\
             drain_timeout: 5s\n\
             allow_host: [ferry.example, models.example]\n",
            elsewhere.display()
        ),
    )
    .unwrap();
    // The harness passes --data-dir and --listen as flags: they win over the file.
    let dir = tmp.path().join("d");
    let s = Server::start_in(&dir, &["--config", config.to_str().unwrap()]).await;
    assert!(dir.join("admin-token").exists());
    assert!(
        !elsewhere.exists(),
        "the flag's --data-dir wins over the file"
    );
    s.add("cancer", "1", "cancer-v1.onnx");
    let (status, _, _) = s.infer("/v2/models/cancer/infer", &batch(1)).await;
    assert_eq!(status, 200);
    // max-body-bytes from the file.
    let (status, _, body) = s.infer("/v2/models/cancer/infer", &batch(20)).await;
    assert_eq!(status, 413, "{body}");
    // allow_host from the file, as a list.
    for host in ["ferry.example", "models.example"] {
        let r = s
            .http
            .get(s.at("/v2/health/live"))
            .header("host", host)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "Host {host}");
    }
    let r = s
        .http
        .get(s.at("/v2/health/live"))
        .header("host", "other.example")
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), 200);

    // A flag given on the command line overrides the file's value.
    let dir2 = tmp.path().join("d2");
    let s2 = Server::start_in(
        &dir2,
        &[
            "--config",
            config.to_str().unwrap(),
            "--max-body-bytes",
            "1000000",
        ],
    )
    .await;
    s2.add("cancer", "1", "cancer-v1.onnx");
    let (status, _, _) = s2.infer("/v2/models/cancer/infer", &batch(20)).await;
    assert_eq!(status, 200);
}

#[test]
fn a_config_file_with_an_unknown_key_or_bad_value_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("ferry.yaml");
    for (text, wanted) in [
        ("max_body_byte: 4096\n", "unknown key `max_body_byte`"),
        ("listen: [1, 2]\n", "listen"),
        ("drain_timeout: soon\n", "drain-timeout"),
        ("- listen\n", "a mapping"),
    ] {
        std::fs::write(&config, text).unwrap();
        let out = Command::new(ferry_binary())
            .args(["serve", "--data-dir"])
            .arg(tmp.path().join("d"))
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}: {stderr}");
        assert!(stderr.contains(wanted), "{text}: {stderr}");
        assert!(
            stderr.contains(&config.display().to_string()),
            "{text}: {stderr}"
        );
    }
    assert!(!tmp.path().join("d").exists(), "nothing was started");
}
