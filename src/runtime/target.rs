//! Where a remote version lives ([`RemoteTarget`]: a server, the model on
//! it, and whether it speaks REST or gRPC) and how its metadata becomes a
//! [`Signature`]: what both remote transports share (`remote.rs` for REST,
//! `grpc_remote.rs` for gRPC), so neither names the other's internals.

use reqwest::Url;

use super::RuntimeError;
use crate::protocol::{DataType, Signature, TensorSpec};

/// Where a remote version lives: a server and the model (and version) on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteTarget {
    /// `http://host:port`, no path.
    pub base: String,
    pub model: String,
    pub version: Option<String>,
}

impl RemoteTarget {
    /// Parses `http://host:port` (the model named `default_model` there),
    /// `http://host:port/v2/models/NAME[/versions/V]`, or a gRPC server's
    /// `grpc://host:port[/NAME[/V]]`.
    pub fn parse(url: &str, default_model: &str) -> Result<RemoteTarget, String> {
        let parsed = Url::parse(url).map_err(|e| format!("URL {url:?} is not valid: {e}"))?;
        let scheme = parsed.scheme();
        if !["http", "https", "grpc"].contains(&scheme) {
            return Err(format!(
                "URL {url:?}: endpoints are http:// or https:// (grpc:// for a gRPC server), not {scheme}://"
            ));
        }
        let host = parsed
            .host_str()
            .ok_or_else(|| format!("URL {url:?} has no host"))?;
        let base = match parsed.port() {
            Some(p) => format!("{scheme}://{host}:{p}"),
            None => format!("{scheme}://{host}"),
        };
        let segments: Vec<&str> = parsed
            .path_segments()
            .map(|s| s.filter(|x| !x.is_empty()).collect())
            .unwrap_or_default();
        let (model, version) = match segments.as_slice() {
            [] => (default_model.to_string(), None),
            [name] if scheme == "grpc" => (name.to_string(), None),
            [name, v] if scheme == "grpc" => (name.to_string(), Some(v.to_string())),
            _ if scheme == "grpc" => {
                return Err(format!(
                    "URL {url:?}: the path of a gRPC endpoint must be empty or /MODEL[/VERSION]"
                ));
            }
            ["v2", "models", name] => (name.to_string(), None),
            ["v2", "models", name, "versions", v] => (name.to_string(), Some(v.to_string())),
            _ => {
                return Err(format!(
                    "URL {url:?}: the path must be empty or /v2/models/NAME[/versions/VERSION]"
                ));
            }
        };
        Ok(RemoteTarget {
            base,
            model,
            version,
        })
    }

    /// `/v2/models/NAME[/versions/V]` on the remote server (`/NAME[/V]` on
    /// a gRPC server).
    pub fn model_url(&self) -> String {
        if self.is_grpc() {
            return match &self.version {
                Some(v) => format!("{}/{}/{}", self.base, self.model, v),
                None => format!("{}/{}", self.base, self.model),
            };
        }
        match &self.version {
            Some(v) => format!("{}/v2/models/{}/versions/{}", self.base, self.model, v),
            None => format!("{}/v2/models/{}", self.base, self.model),
        }
    }

    pub fn is_https(&self) -> bool {
        self.base.starts_with("https://")
    }

    /// Whether the endpoint speaks gRPC (`grpc://`).
    pub fn is_grpc(&self) -> bool {
        self.base.starts_with("grpc://")
    }

    /// The form users write, for display and storage.
    pub fn display(&self) -> String {
        self.model_url()
    }
}

/// A remote model's signature from its metadata's (name, datatype, shape)
/// lists, refusing datatypes Ferry cannot carry.
pub(super) fn signature_of(
    inputs: Vec<(String, String, Vec<i64>)>,
    outputs: Vec<(String, String, Vec<i64>)>,
) -> Result<Signature, RuntimeError> {
    let convert = |specs: Vec<(String, String, Vec<i64>)>, role: &str| {
        specs
            .into_iter()
            .map(|(name, datatype, shape)| {
                let datatype = DataType::parse(&datatype).ok_or_else(|| {
                    RuntimeError::UnsupportedSignature(format!(
                        "remote {role} \"{name}\" has datatype {datatype}; Ferry serves BOOL, integer and floating-point tensors"
                    ))
                })?;
                Ok(TensorSpec { name, datatype, shape })
            })
            .collect::<Result<Vec<_>, RuntimeError>>()
    };
    Ok(Signature {
        inputs: convert(inputs, "input")?,
        outputs: convert(outputs, "output")?,
    })
}
