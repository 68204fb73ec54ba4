//! The Kubernetes manifests in `deploy/kubernetes/` agree with the binary:
//! every file parses, the container runs `ferry serve` with options that
//! `ferry serve --help` lists (a renamed flag breaks this test), the probes
//! reach `/v2/health/ready` and `/v2/health/live` on the port `--listen`
//! names, the environment variables are ones Ferry (or the AWS client)
//! reads, the Secrets hold the keys the Deployment asks for, the data dir is
//! an emptyDir, and the Service reaches the container's ports.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use ferry::store::{BucketUrl, StoreUrl};
use serde::Deserialize;
use serde_json::Value;

use super::harness::{ferry_binary, repo};

/// Every document of every manifest, as JSON values.
fn manifests() -> Vec<(String, Value)> {
    let dir = repo().join("deploy/kubernetes");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "deploy/kubernetes has its manifests");
    let mut documents = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        for doc in yaml_serde::Deserializer::from_str(&text) {
            let value =
                Value::deserialize(doc).unwrap_or_else(|e| panic!("{name} is not valid YAML: {e}"));
            for field in ["apiVersion", "kind"] {
                assert!(
                    value[field].is_string(),
                    "{name}: a document without {field}"
                );
            }
            assert!(
                value["metadata"]["name"].is_string(),
                "{name}: no metadata.name"
            );
            documents.push((name.clone(), value));
        }
    }
    documents
}

fn one<'a>(docs: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    let found: Vec<_> = docs
        .iter()
        .filter(|(_, d)| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "one {kind} named {name}");
    &found[0].1
}

/// `ferry serve --help`: its long flags and the environment variables it names.
fn serve_help() -> (BTreeSet<String>, BTreeSet<String>) {
    let out = Command::new(ferry_binary())
        .args(["serve", "--help"])
        .output()
        .expect("ferry runs");
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let flags = help
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| w.trim_end_matches([',', '=']).to_string())
        .collect();
    let env = help
        .split("[env: ")
        .skip(1)
        .map(|rest| rest.split([']', '=']).next().unwrap().trim().to_string())
        .collect();
    (flags, env)
}

/// `--flag=value` arguments, by flag.
fn options(args: &[Value]) -> BTreeMap<String, String> {
    args.iter()
        .map(|a| {
            let a = a.as_str().expect("args are strings");
            let (flag, value) = a.split_once('=').unwrap_or((a, ""));
            (flag.to_string(), value.to_string())
        })
        .collect()
}

fn port_of(address: &str) -> u64 {
    address.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn the_kubernetes_manifests_run_ferry_serve_as_the_binary_understands_it() {
    let docs = manifests();
    let deployment = one(&docs, "Deployment", "ferry");
    let pod = &deployment["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().unwrap();
    let ferry = containers
        .iter()
        .find(|c| c["name"] == "ferry")
        .expect("a ferry container");
    assert_eq!(ferry["command"], serde_json::json!(["ferry", "serve"]));

    let (flags, help_env) = serve_help();
    let args = options(ferry["args"].as_array().unwrap());
    for flag in args.keys() {
        assert!(flags.contains(flag), "ferry serve has no {flag}: {flags:?}");
    }

    // The probes reach the health endpoints on the REST port.
    let listen = port_of(&args["--listen"]);
    for (probe, path) in [
        ("readinessProbe", "/v2/health/ready"),
        ("livenessProbe", "/v2/health/live"),
    ] {
        let get = &ferry[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(
            get["port"].as_u64(),
            Some(listen),
            "{probe} on --listen's port"
        );
    }
    let ports: BTreeMap<String, u64> = ferry["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ports["http"], listen);
    assert_eq!(ports["grpc"], port_of(&args["--grpc-listen"]));

    // Every variable set is read by Ferry, or names a field of the pod.
    let env = ferry["env"].as_array().unwrap();
    let defined: BTreeSet<&str> = env.iter().map(|e| e["name"].as_str().unwrap()).collect();
    for e in env {
        let name = e["name"].as_str().unwrap();
        if let Some(field) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            assert_eq!((name, field), ("POD_IP", "status.podIP"));
            continue;
        }
        assert!(
            help_env.contains(name) || name == "FERRY_LOG",
            "ferry does not read {name}"
        );
    }
    for (flag, value) in &args {
        for var in value
            .split("$(")
            .skip(1)
            .map(|r| r.split(')').next().unwrap())
        {
            assert!(
                defined.contains(var),
                "{flag} uses $({var}), which is not defined"
            );
        }
    }
    let advertise = args["--advertise-url"].replace("$(POD_IP)", "10.0.0.7");
    assert_eq!(advertise, format!("http://10.0.0.7:{listen}"));

    // The store URL comes from the Secret, which has that key and a valid URL.
    let store_ref =
        &env.iter().find(|e| e["name"] == "FERRY_STORE").unwrap()["valueFrom"]["secretKeyRef"];
    let secret = one(&docs, "Secret", store_ref["name"].as_str().unwrap());
    let key = store_ref["key"].as_str().unwrap();
    StoreUrl::parse(
        secret["stringData"][key]
            .as_str()
            .expect("the Secret has the key"),
    )
    .unwrap();

    // The artifacts Secret: Ferry's variable and the AWS client's.
    for from in ferry["envFrom"].as_array().unwrap() {
        let secret = one(&docs, "Secret", from["secretRef"]["name"].as_str().unwrap());
        for (name, value) in secret["stringData"].as_object().unwrap() {
            if let Some(aws) = name.strip_prefix("AWS_") {
                let key = format!("aws_{}", aws.to_ascii_lowercase());
                assert!(
                    key.parse::<object_store::aws::AmazonS3ConfigKey>().is_ok(),
                    "the S3 client does not read {name}"
                );
            } else {
                assert!(help_env.contains(name), "ferry does not read {name}");
            }
            if name == "FERRY_ARTIFACTS" {
                BucketUrl::parse(value.as_str().unwrap()).unwrap();
            }
        }
    }

    // The data dir is an emptyDir (the artifact cache); the admin token in it
    // comes from the Secret, the same for every instance.
    let data_dir = &args["--data-dir"];
    let mounts = ferry["volumeMounts"].as_array().unwrap();
    let volume = |name: &Value| {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == *name)
            .expect("the mounted volume is defined")
            .clone()
    };
    let data = mounts
        .iter()
        .find(|m| m["mountPath"] == data_dir.as_str())
        .expect("the data dir is mounted");
    assert!(
        volume(&data["name"])["emptyDir"].is_object(),
        "the data dir is an emptyDir"
    );
    let token = mounts
        .iter()
        .find(|m| m["mountPath"] == format!("{data_dir}/admin-token"))
        .expect("the admin token is mounted in the data dir");
    let token_volume = volume(&token["name"]);
    let token_secret = one(
        &docs,
        "Secret",
        token_volume["secret"]["secretName"].as_str().unwrap(),
    );
    assert!(token_secret["stringData"]["admin-token"].is_string());

    for resource in ["cpu", "memory"] {
        assert!(
            ferry["resources"]["requests"][resource].is_string(),
            "a {resource} request"
        );
    }

    // The Service selects the pods and reaches their named ports.
    let service = one(&docs, "Service", "ferry");
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (k, v) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[k], v, "the Service selects the pods by {k}");
    }
    for port in service["spec"]["ports"].as_array().unwrap() {
        let target = port["targetPort"].as_str().unwrap();
        assert!(
            ports.contains_key(target),
            "the Service's {target} is a container port"
        );
    }
}
