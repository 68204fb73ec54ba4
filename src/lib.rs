//! Ferry serves machine-learning models and ships new versions of them into
//! production safely.
//!
//! # Layout
//!
//! The inference path and the control path meet only at the route table
//! (the controller writes it, the gateway reads it) and the metrics.
//!
//! ```text
//!  clients ──HTTP/gRPC──▶ api/grpc ──▶ gateway ──▶ pool(version) ──▶ replica ──▶ runtime (ONNX Runtime | remote V2)
//!                     │        └─ reads RouteTable (ArcSwap snapshot), records metrics
//!  ferry CLI ─HTTP──▶ api ──▶ controller ──▶ registry ──▶ store (SQLite) ; publishes RouteTable
//! ```
//!
//! | module | owns |
//! |---|---|
//! | [`protocol`] | Open Inference Protocol types, the JSON and binary tensor codec, error body |
//! | [`runtime`] | ONNX Runtime sessions on worker threads, remote V2 clients, model signatures |
//! | [`records`] | the plain data every layer shares: models, versions, settings, sources, name rules |
//! | [`registry`] | models, versions, labels, serving settings, content-addressed artifacts, validation |
//! | [`gateway`] | per-request choice of version and replica, from the route table |
//! | [`metrics`] | per-version counters and latency histograms; Prometheus export |
//! | [`controller`] | what serves: loading versions, publishing routes, rollouts, recording changes first; following the changes other instances made |
//! | [`spec`] | rollout specs (YAML/JSON) as validated types |
//! | [`strategy`] | pure rollout plans: basic, multi, canary |
//! | [`analysis`] | pure verdicts over metric windows, significance tests, the A/B report |
//! | [`store`] | durable state behind a trait; SQLite embedded, PostgreSQL shared by several instances |
//! | [`api`] | HTTP wiring: `/v2`, `/api/v1`, `/metrics`, OpenAPI, auth, error mapping |
//! | [`grpc`] | the gRPC front door (`inference.GRPCInferenceService`) to the same gateway |
//! | [`cli`] | the `ferry` subcommands, a client of the control API; `demo`, `traffic` |
//! | [`dashboard`] | the static page at `/ui/`, embedded in the binary |
//! | [`server`] | `ferry serve`: wiring everything together |
//! | [`units`] | durations with units (`500ms`, `2s`) and timestamps |
//! | [`crashpoint`] | named points where crash tests abort the process (debug builds) |
//!
//! `ARCHITECTURE.md` gives the bird's-eye view and the invariants.

pub mod analysis;
pub mod api;
pub mod cli;
pub mod controller;
pub mod crashpoint;
pub mod dashboard;
pub mod gateway;
pub mod grpc;
pub mod metrics;
pub mod protocol;
pub mod records;
pub mod registry;
pub mod runtime;
pub mod server;
pub mod spec;
pub mod store;
pub mod strategy;
pub mod units;
