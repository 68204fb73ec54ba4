//! The control and data-plane API checked against its own OpenAPI document
//! with schemathesis (from the package index, in a venv under the target
//! dir): no 5xx, every status code and body as documented, the admin token
//! enforced. A fixed seed keeps the run the same from one CI run to the next.

use std::process::Command;

use super::harness::{Server, python_with};

const REQUIREMENTS: &[&str] = &["schemathesis==4.32.5"];

#[tokio::test]
async fn the_api_matches_its_openapi_document_under_schemathesis() {
    let bin = tokio::task::spawn_blocking(|| python_with("schemathesis", REQUIREMENTS))
        .await
        .unwrap();
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    let (url, token) = (s.url.clone(), s.token());
    // schemathesis keeps a cache in its working directory: the server's
    // temporary directory, not the checkout.
    let scratch = s
        .dir
        .parent()
        .expect("the data dir has a parent")
        .to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin.join("schemathesis"))
            .current_dir(scratch)
            .arg("run")
            .arg(format!("{url}/api/v1/openapi.json"))
            .args(["--header", &format!("Authorization: Bearer {token}")])
            // Every check but the two that judge how strict validation is:
            // "positive_data_acceptance" (the document describes shapes, not
            // every rule: a rollout's versions must exist, names in bodies
            // are non-empty; those refusals are clear 4xx by design) and
            // "negative_data_rejection" (serde accepts a struct written as a
            // JSON array, harmlessly).
            .args(["--checks", "all", "--exclude-checks"])
            .arg("positive_data_acceptance,negative_data_rejection")
            // Repository unload of the stable version takes the model out of
            // service on purpose (as Triton does): every inference after it
            // is a documented 503 "unloaded", which schemathesis counts as a
            // server error. `repository_unload_takes_the_model_out_of_service_
            // and_load_brings_it_back` (data_plane.rs) covers it, token included.
            .args(["--exclude-path", "/v2/repository/models/{model}/unload"])
            .args(["--max-examples", "25", "--seed", "20261126"])
            .args(["--request-timeout", "10", "--no-color"])
            .env("SCHEMATHESIS_HOOKS", "")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found failures:\n{text}");
    // And the server is still healthy after it.
    let r = s.http.get(s.at("/v2/health/ready")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}
