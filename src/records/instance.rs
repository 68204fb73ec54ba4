//! One `ferry serve` instance as the store knows it: what it reports every
//! heartbeat (where it is reached, which route version it serves, which
//! versions it holds warm, what it could not load). Plain data: the store
//! keeps it, the controller reports it, the API and the CLI show it.

use serde::{Deserialize, Serialize};

/// A version this instance could not load, and why (the controller's words).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LoadFailure {
    /// `model/version`.
    pub version: String,
    pub reason: String,
}

/// What an instance reports about itself; `last_seen` is stamped by the
/// store when the report is written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceReport {
    /// Random, chosen at start: stable for the process's life.
    pub id: String,
    /// How other instances and the CLI reach it (`--advertise-url`).
    pub url: String,
    /// The Ferry build it runs.
    pub version: String,
    pub started_at: String,
    /// The route version whose changes this instance has applied.
    pub route_version: i64,
    /// Every `model/version` in its published routes (loaded and warm).
    pub warm: Vec<String>,
    /// Versions it was asked to serve and could not load.
    pub failures: Vec<LoadFailure>,
}

/// A stored report with the time it was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub report: InstanceReport,
    /// When the store last heard from it (ms since the epoch, the store's
    /// writer's clock).
    pub last_seen_ms: u64,
}
