//! The plain data every layer shares, and nothing else: models, versions,
//! their sources and serving settings, and the rules for names. It imports
//! no service of the crate (only the protocol's signature and units), so the
//! gateway, the store and the registry can all use it without a loop.

pub mod event;
pub mod instance;
pub mod variant;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::protocol::Signature;
use crate::units::HumanDuration;

pub use crate::display_from_serde;
pub use event::EventKind;
pub use instance::{InstanceRecord, InstanceReport, LoadFailure};
pub use variant::variant_name;

/// A model: the name clients call.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ModelRecord {
    pub name: String,
    /// The version serving production traffic (the first one registered,
    /// until a rollout changes it).
    pub stable: Option<String>,
    pub created_at: String,
    /// Who took the model out of service (repository `unload`); it serves
    /// nothing until a repository `load`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unloaded: Option<String>,
}

/// Where a version's answers come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// An ONNX file stored as `blobs/sha256/<digest>`.
    Onnx { digest: String, size: u64 },
    /// Endpoints of a remote V2 server; each one is a replica.
    /// `access`: TLS and headers, by reference (paths, variable names),
    /// never values.
    Remote {
        endpoints: Vec<String>,
        #[serde(default, skip_serializing_if = "RemoteAccess::is_empty")]
        access: RemoteAccess,
    },
}

impl Source {
    /// The source in a few words, for events and logs.
    pub fn summary(&self) -> String {
        match self {
            Source::Onnx { digest, size } => {
                let short = digest.get(..12).unwrap_or(digest);
                format!("ONNX sha256:{short} ({size} bytes)")
            }
            Source::Remote { endpoints, .. } => format!("remote {}", endpoints.join(", ")),
        }
    }
}

/// How a version runs whenever it serves. For remote versions the replicas
/// are the endpoints, and `replicas`/`threads` do not apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServingSettings {
    /// ONNX Runtime sessions, each on its own worker thread.
    pub replicas: u32,
    /// Intra-op threads per session; replicas × threads should not exceed the cores.
    pub threads: u32,
    /// Requests that may wait per replica before new ones get 503 + Retry-After.
    pub queue: u32,
    /// Longest wait for an answer before the request fails.
    #[schema(value_type = String, example = "2s")]
    pub timeout: HumanDuration,
    /// Adaptive batching: up to this many concurrent requests merged into
    /// one run (1: off).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub batch_max: u32,
    /// Adaptive batching: how long the first request of a batch waits for
    /// others (default 2ms when batching is on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "2ms")]
    pub batch_delay: Option<HumanDuration>,
}

fn one() -> u32 {
    1
}

fn is_one(v: &u32) -> bool {
    *v == 1
}

impl Default for ServingSettings {
    fn default() -> Self {
        ServingSettings {
            replicas: 1,
            threads: 1,
            queue: 128,
            timeout: HumanDuration(Duration::from_secs(2)),
            batch_max: 1,
            batch_delay: None,
        }
    }
}

/// A change to some serving settings; absent fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettingsPatch {
    pub replicas: Option<u32>,
    pub threads: Option<u32>,
    pub queue: Option<u32>,
    #[schema(value_type = Option<String>, example = "2s")]
    pub timeout: Option<HumanDuration>,
    pub batch_max: Option<u32>,
    #[schema(value_type = Option<String>, example = "2ms")]
    pub batch_delay: Option<HumanDuration>,
}

impl ServingSettings {
    /// The batching window, when batching is on.
    pub fn batching(&self) -> Option<(usize, Duration)> {
        (self.batch_max > 1).then(|| {
            (
                self.batch_max as usize,
                self.batch_delay.map_or(Duration::from_millis(2), |d| d.0),
            )
        })
    }

    pub fn apply(&self, patch: &SettingsPatch) -> ServingSettings {
        ServingSettings {
            replicas: patch.replicas.unwrap_or(self.replicas),
            threads: patch.threads.unwrap_or(self.threads),
            queue: patch.queue.unwrap_or(self.queue),
            timeout: patch.timeout.unwrap_or(self.timeout),
            batch_max: patch.batch_max.unwrap_or(self.batch_max),
            batch_delay: patch.batch_delay.or(self.batch_delay),
        }
    }

    /// Checks the ranges; the error names the setting and the allowed range.
    pub fn validate(&self) -> Result<(), String> {
        let check = |name: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name} must be between {lo} and {hi}, not {v}"))
            }
        };
        check("replicas", self.replicas.into(), 1, 64)?;
        check("threads", self.threads.into(), 1, 256)?;
        check("queue", self.queue.into(), 1, 1_000_000)?;
        check("batch_max", self.batch_max.into(), 1, 1024)?;
        if let Some(d) = self.batch_delay
            && d.0 > Duration::from_millis(100)
        {
            return Err(format!("batch_delay must be at most 100ms, not {d}"));
        }
        let t = self.timeout.0;
        if t < Duration::from_millis(1) || t > Duration::from_secs(600) {
            return Err(format!(
                "timeout must be between 1ms and 10m, not {}",
                self.timeout
            ));
        }
        Ok(())
    }
}

/// A registered version of a model (immutable but for its serving settings).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VersionRecord {
    pub model: String,
    pub version: String,
    pub source: Source,
    pub signature: Signature,
    pub labels: BTreeMap<String, String>,
    pub settings: ServingSettings,
    pub created_at: String,
    /// Loaded beside the stable version through the repository API, so it can
    /// be called with `/versions/{v}`.
    pub loaded: bool,
}

/// How to reach a remote version beyond its URLs: its TLS trust and client
/// certificate (paths on the server), and request headers given by
/// reference, `NAME=@env:VAR` or `NAME=@file:PATH`, read by the server when
/// the version starts (`runtime::remote`). Only these references are
/// stored, logged or shown.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoteAccess {
    /// PEM CA certificate(s) to trust instead of the system's (a path on the server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<String>,
    /// PEM client certificate chain for mutual TLS (a path on the server); needs `client_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<String>,
    /// PEM private key of `client_cert` (a path on the server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<String>,
    /// Request headers, `NAME=@env:VAR` or `NAME=@file:PATH`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
}

/// Where a remote header's value comes from.
#[derive(Debug, PartialEq, Eq)]
pub enum HeaderRef<'a> {
    Env(&'a str),
    File(&'a str),
}

impl RemoteAccess {
    pub fn is_empty(&self) -> bool {
        *self == RemoteAccess::default()
    }

    /// Headers a remote header may not name: Ferry writes them on each
    /// request, and a second copy would change how the remote reads it.
    const SET_BY_FERRY: [&str; 12] = [
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "te",
        "trailer",
        "expect",
        "content-type",
        "inference-header-content-length",
        crate::protocol::REQUEST_ID_HEADER,
    ];

    /// A header reference, `NAME=@env:VAR` or `NAME=@file:PATH`, split;
    /// a name Ferry sets itself is refused.
    pub fn header(spec: &str) -> Result<(hyper::header::HeaderName, HeaderRef<'_>), String> {
        let bad = || {
            format!(
                "remote header {spec:?} must be NAME=@env:VAR or NAME=@file:PATH (the value is read by the server, never stored)"
            )
        };
        let (name, from) = spec.split_once('=').ok_or_else(bad)?;
        let name = hyper::header::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("remote header {spec:?}: {name:?} is not a header name"))?;
        if Self::SET_BY_FERRY.contains(&name.as_str()) {
            return Err(format!(
                "remote header {spec:?}: {name} is set by Ferry on each request (it frames the request, says \
                 how to read it, or names it); only other headers (host, authorization, routing headers) may be given"
            ));
        }
        let from = if let Some(var) = from.strip_prefix("@env:") {
            HeaderRef::Env(var)
        } else if let Some(path) = from.strip_prefix("@file:") {
            HeaderRef::File(path)
        } else {
            return Err(bad());
        };
        Ok((name, from))
    }

    /// Checks the shape (not the files or variables, read at start).
    pub fn validate(&self) -> Result<(), String> {
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(
                "a client certificate needs its key: give both --remote-client-cert and --remote-client-key"
                    .into(),
            );
        }
        for h in &self.headers {
            Self::header(h)?;
        }
        Ok(())
    }
}

/// A model or version name that is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{kind} name \"{shown}\" is not allowed: use 1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
)]
pub struct NameError {
    /// `model` or `version`.
    pub kind: String,
    /// The name as [`shown_name`] shows it.
    pub shown: String,
}

/// A client-supplied name as error messages show it: control characters
/// escaped, and at most 40 characters (then `…`), so a hostile name cannot
/// flood a message or a log line.
pub fn shown_name(name: &str) -> String {
    let mut shown: String = name
        .chars()
        .take(40)
        .collect::<String>()
        .escape_debug()
        .to_string();
    if name.chars().nth(40).is_some() {
        shown.push('…');
    }
    shown
}

/// The names [`check_name`] accepts, as a regular expression (for the
/// OpenAPI document).
pub const NAME_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$";

/// Checks a model or version name: 1–128 characters from `A-Z a-z 0-9 . _ -`,
/// starting with a letter or digit (so never `.`, `..` or a path).
pub fn check_name(kind: &str, name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(NameError {
            kind: kind.to_string(),
            shown: shown_name(name),
        })
    }
}

/// The name in `names` that `wanted` was most likely meant to be: within
/// two edits (one for names of up to four characters), the nearest first.
pub fn closest<'a>(wanted: &str, names: &'a [String]) -> Option<&'a str> {
    let limit = if wanted.chars().count() <= 4 { 1 } else { 2 };
    names
        .iter()
        .map(|n| (edit_distance(&wanted.to_lowercase(), &n.to_lowercase()), n))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n.as_str())
}

/// Levenshtein distance (insertions, deletions, substitutions), by chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diagonal + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_headers_may_not_name_what_frames_the_request() {
        let (name, from) = RemoteAccess::header("Host=@file:/etc/vhost").unwrap();
        assert_eq!(
            (name.as_str(), from),
            ("host", HeaderRef::File("/etc/vhost"))
        );
        assert!(RemoteAccess::header("authorization=@env:TOKEN").is_ok());
        for framing in [
            "Content-Length",
            "transfer-encoding",
            "Connection",
            "content-type",
            "X-Ferry-Request-Id",
        ] {
            let err = RemoteAccess::header(&format!("{framing}=@env:X")).unwrap_err();
            assert!(err.contains("is set by Ferry"), "{err}");
        }
    }

    #[test]
    fn a_typo_suggests_the_registered_name() {
        let names = vec!["cancer".to_string(), "fraud".to_string()];
        assert_eq!(closest("canser", &names), Some("cancer"));
        assert_eq!(closest("Cancer", &names), Some("cancer"));
        assert_eq!(closest("frud", &names), Some("fraud"));
        assert_eq!(closest("churn", &names), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn names_are_a_safe_character_set() {
        for ok in ["cancer", "v1", "2024-06-01", "a.b_c-d"] {
            assert!(check_name("model", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../etc",
            "a/b",
            "a\0b",
            "-x",
            &"x".repeat(129),
            "é",
        ] {
            assert!(check_name("model", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn settings_are_range_checked_and_patched() {
        let s = ServingSettings::default();
        assert!(s.validate().is_ok());
        let patched = s.apply(&SettingsPatch {
            replicas: Some(0),
            ..Default::default()
        });
        assert_eq!(
            patched.validate().unwrap_err(),
            "replicas must be between 1 and 64, not 0"
        );
        let patched = s.apply(&SettingsPatch {
            timeout: Some(HumanDuration(Duration::from_secs(3600))),
            ..Default::default()
        });
        assert!(
            patched
                .validate()
                .unwrap_err()
                .starts_with("timeout must be")
        );
    }
}
