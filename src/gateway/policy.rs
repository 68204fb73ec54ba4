//! The routing policy of a model: which versions take which requests. Policy
//! is data — the controller writes it (and persists it), the gateway reads it
//! — never branches scattered in handlers.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::units::HumanDuration;

/// How one model's traffic is served. Rollouts change it; an operator can set
/// it directly (`PUT /api/v1/models/{model}/route`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoutePolicy {
    /// The version serving production traffic.
    pub stable: String,
    /// A version taking a share of production traffic (canary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<CandidateSplit>,
    /// The version reached by `x-ferry-env: staging` (blue-green).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging: Option<String>,
    /// Versions tried in order when the stable version fails a request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover: Vec<String>,
    /// When to stop sending to a failing version of the failover chain.
    #[serde(default)]
    pub breaker: BreakerSettings,
    /// Per-request timeout for this model (default: each version's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "500ms")]
    pub timeout: Option<HumanDuration>,
    /// A version receiving mirrored copies of production requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowPolicy>,
    /// Versions kept loaded and warm without traffic (a blue version after a
    /// blue-green switch), until the given time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warm: Vec<WarmVersion>,
    /// Replica counts for this route, overriding versions' own settings
    /// (a rolling update's pool split).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub replicas: BTreeMap<String, u32>,
    /// The instances (ids) that send every request to the candidate, the
    /// others sending none there (a rolling update across instances); the
    /// candidate's weight is then their share of the instances, as shown,
    /// not a split inside an instance ([`RoutePolicy::for_instance`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidate_instances: Vec<String>,
}

/// A version kept loaded without traffic until `until_ms` (Unix ms).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WarmVersion {
    pub version: String,
    pub until_ms: u64,
}

/// The candidate's share of production traffic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CandidateSplit {
    pub version: String,
    /// Percent of eligible requests, 0–100, to 0.01.
    pub weight: f64,
    /// A request header (e.g. `x-user-id`) whose value pins a user to a
    /// version: the same key always gets the same answer at a given weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_header: Option<String>,
    /// Only requests matching every rule are eligible for the candidate.
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<MatchRule>,
}

/// A cohort rule: the header equals one of the values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MatchRule {
    pub header: String,
    pub values: Vec<String>,
}

/// Shadow mirroring: copies of production requests to a version whose
/// answers are compared, never returned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShadowPolicy {
    pub version: String,
    /// Percent of production requests copied, 0–100.
    pub percent: f64,
    pub compare: Compare,
    /// Copies in flight at most; beyond it copies are dropped and counted.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
}

fn default_max_in_flight() -> u32 {
    64
}

/// How a shadow's answer is compared with the primary's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Compare {
    /// The output compared, e.g. `probabilities` or `label`.
    pub output: String,
    #[serde(default)]
    pub mode: CompareMode,
    /// For `abs`: the largest allowed difference of any element.
    #[serde(default)]
    pub tolerance: f64,
}

/// `class`: the same predicted class for every row; `abs`: every element
/// within the tolerance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CompareMode {
    #[default]
    Class,
    Abs,
}

/// Circuit breaker settings for the failover chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSettings {
    /// Error rate over `window` at which a version's circuit opens.
    pub error_rate: f64,
    /// Consecutive failures that open the circuit at once.
    pub consecutive_failures: u32,
    /// The window the error rate is measured over.
    #[schema(value_type = String, example = "10s")]
    pub window: HumanDuration,
    /// Requests needed in the window before the error rate counts.
    pub min_requests: u32,
    /// How often an open circuit lets one probe request through.
    #[schema(value_type = String, example = "1s")]
    pub probe_every: HumanDuration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            error_rate: 0.5,
            consecutive_failures: 5,
            window: HumanDuration(Duration::from_secs(10)),
            min_requests: 10,
            probe_every: HumanDuration(Duration::from_secs(1)),
        }
    }
}

impl BreakerSettings {
    /// Checks the settings; `field` is where they sit (`breaker`,
    /// `strategy.multi.breaker`), for the message.
    pub fn validate(&self, field: &str) -> Result<(), String> {
        if !(self.error_rate > 0.0 && self.error_rate <= 1.0) {
            return Err(format!(
                "{field}.error_rate must be in (0, 1], not {}",
                self.error_rate
            ));
        }
        if self.window.0 < Duration::from_secs(1) {
            return Err(format!("{field}.window must be at least 1s"));
        }
        if self.probe_every.0 < Duration::from_millis(1) {
            return Err(format!("{field}.probe_every must be at least 1ms"));
        }
        Ok(())
    }
}

impl CandidateSplit {
    /// The weight in hundredths of a percent (0–10,000).
    pub fn basis_points(&self) -> u32 {
        (self.weight * 100.0).round().clamp(0.0, 10_000.0) as u32
    }
}

impl RoutePolicy {
    /// A policy where the stable version takes everything.
    pub fn stable_only(version: &str) -> RoutePolicy {
        RoutePolicy {
            stable: version.to_string(),
            candidate: None,
            staging: None,
            failover: Vec::new(),
            breaker: BreakerSettings::default(),
            timeout: None,
            shadow: None,
            warm: Vec::new(),
            replicas: BTreeMap::new(),
            candidate_instances: Vec::new(),
        }
    }

    /// The route as the instance `me` serves it. A route naming the
    /// instances on the candidate (`candidate_instances`) sends all of their
    /// requests to it — the stable version stays loaded there, without
    /// traffic, so taking the instance back is a swap, not a load — and
    /// none of anyone else's (the candidate is not loaded there). An
    /// instance that does not know its id yet counts as one of the others.
    /// Every other route is the same on every instance.
    pub fn for_instance(&self, me: Option<&str>) -> RoutePolicy {
        let mut route = self.clone();
        if route.candidate_instances.is_empty() {
            return route;
        }
        let ids = std::mem::take(&mut route.candidate_instances);
        let on_candidate = me.is_some_and(|me| ids.iter().any(|id| id == me));
        match route.candidate.as_mut() {
            Some(c) if on_candidate => c.weight = 100.0,
            Some(_) => {
                if let Some(c) = route.candidate.take() {
                    route.replicas.remove(&c.version);
                }
            }
            None => {}
        }
        route
    }

    /// Every version the policy needs loaded.
    pub fn versions(&self) -> BTreeSet<&str> {
        let mut v = BTreeSet::new();
        v.insert(self.stable.as_str());
        if let Some(c) = &self.candidate {
            v.insert(c.version.as_str());
        }
        if let Some(s) = &self.staging {
            v.insert(s.as_str());
        }
        v.extend(self.failover.iter().map(String::as_str));
        if let Some(s) = &self.shadow {
            v.insert(s.version.as_str());
        }
        v.extend(self.warm.iter().map(|w| w.version.as_str()));
        v
    }

    /// The policy in a line a person can read (for events and the CLI).
    pub fn describe(&self) -> String {
        let mut parts = vec![format!("stable {}", self.stable)];
        if let Some(c) = &self.candidate {
            let mut s = format!("candidate {} at {}%", c.version, c.weight);
            if let Some(h) = &c.sticky_header {
                s += &format!(", sticky on {h}");
            }
            for m in &c.matches {
                s += &format!(", only {}={}", m.header, m.values.join("|"));
            }
            parts.push(s);
        }
        if let Some(v) = &self.staging {
            parts.push(format!("staging {v}"));
        }
        if !self.failover.is_empty() {
            parts.push(format!("failover {}", self.failover.join(" > ")));
        }
        if let Some(sh) = &self.shadow {
            parts.push(format!("shadow {} mirroring {}%", sh.version, sh.percent));
        }
        for w in &self.warm {
            parts.push(format!("{} kept warm", w.version));
        }
        for (v, n) in &self.replicas {
            parts.push(format!("{v} on {n} replicas"));
        }
        if !self.candidate_instances.is_empty() {
            parts.push(format!(
                "candidate on instance{} {} only",
                if self.candidate_instances.len() == 1 {
                    ""
                } else {
                    "s"
                },
                self.candidate_instances.join(", ")
            ));
        }
        parts.join("; ")
    }

    /// Checks the policy's own consistency; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(c) = &self.candidate {
            if !(0.0..=100.0).contains(&c.weight) || !c.weight.is_finite() {
                return Err(format!(
                    "candidate.weight must be between 0 and 100, not {}",
                    c.weight
                ));
            }
            if c.version == self.stable {
                return Err(format!(
                    "candidate.version \"{}\" is already the stable version",
                    c.version
                ));
            }
            if let Some(h) = &c.sticky_header {
                check_header("candidate.sticky_header", h)?;
            }
            for (i, m) in c.matches.iter().enumerate() {
                check_header(&format!("candidate.match[{i}].header"), &m.header)?;
                if m.values.is_empty() {
                    return Err(format!(
                        "candidate.match[{i}].values must list at least one value"
                    ));
                }
            }
        }
        let mut seen = BTreeSet::from([self.stable.as_str()]);
        for (i, f) in self.failover.iter().enumerate() {
            if !seen.insert(f.as_str()) {
                return Err(format!(
                    "failover[{i}] \"{f}\" appears twice in the chain (the stable version is its first link)"
                ));
            }
        }
        if let Some(s) = &self.shadow {
            if !(0.0..=100.0).contains(&s.percent) || !s.percent.is_finite() {
                return Err(format!(
                    "shadow.percent must be between 0 and 100, not {}",
                    s.percent
                ));
            }
            if s.version == self.stable {
                return Err(format!(
                    "shadow.version \"{}\" is the stable version; a shadow must be another version",
                    s.version
                ));
            }
            if s.max_in_flight == 0 {
                return Err("shadow.max_in_flight must be at least 1".into());
            }
            if s.compare.mode == CompareMode::Abs
                && (s.compare.tolerance.is_nan() || s.compare.tolerance < 0.0)
            {
                return Err("shadow.compare.tolerance must be 0 or more".into());
            }
        }
        if !self.candidate_instances.is_empty() && self.candidate.is_none() {
            return Err(
                "candidate_instances names the instances on the candidate; set candidate too, or leave it out"
                    .into(),
            );
        }
        if self.candidate_instances.len() > 64 {
            return Err(format!(
                "candidate_instances lists {} instances; at most 64 are allowed",
                self.candidate_instances.len()
            ));
        }
        for (v, n) in &self.replicas {
            if *n == 0 || *n > 64 {
                return Err(format!("replicas[{v}] must be between 1 and 64, not {n}"));
            }
        }
        self.breaker.validate("breaker")?;
        if let Some(t) = self.timeout
            && (t.0 < Duration::from_millis(1) || t.0 > Duration::from_secs(600))
        {
            return Err(format!("timeout must be between 1ms and 10m, not {t}"));
        }
        Ok(())
    }
}

fn check_header(field: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{field} \"{name}\" is not a header name Ferry can match: use lowercase letters, digits, - and _"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let mut p = RoutePolicy::stable_only("1");
        assert!(p.validate().is_ok());
        p.candidate = Some(CandidateSplit {
            version: "2".into(),
            weight: 120.0,
            sticky_header: None,
            matches: vec![],
        });
        assert_eq!(
            p.validate().unwrap_err(),
            "candidate.weight must be between 0 and 100, not 120"
        );
        p.candidate.as_mut().unwrap().weight = 10.0;
        p.candidate.as_mut().unwrap().sticky_header = Some("X-User".into());
        assert!(
            p.validate()
                .unwrap_err()
                .starts_with("candidate.sticky_header")
        );
        p.candidate = None;
        p.failover = vec!["0".into(), "1".into()];
        assert!(
            p.validate()
                .unwrap_err()
                .starts_with("failover[1] \"1\" appears twice")
        );
    }

    #[test]
    fn basis_points_have_hundredth_of_a_percent_resolution() {
        let c = CandidateSplit {
            version: "2".into(),
            weight: 0.01,
            sticky_header: None,
            matches: vec![],
        };
        assert_eq!(c.basis_points(), 1);
        assert_eq!(
            CandidateSplit {
                weight: 12.345,
                ..c.clone()
            }
            .basis_points(),
            1235
        );
        assert_eq!(CandidateSplit { weight: 100.0, ..c }.basis_points(), 10_000);
    }

    /// A rolling update across instances: the instances it names serve the
    /// candidate only (the stable version loaded, without traffic), the
    /// others the stable version only (the candidate not even loaded); an
    /// instance with no id yet is one of the others; other routes are the
    /// same everywhere.
    #[test]
    fn each_instance_resolves_its_own_route() {
        let mut p = RoutePolicy::stable_only("1");
        assert_eq!(p.for_instance(Some("a")), p);
        p.candidate = Some(CandidateSplit {
            version: "2".into(),
            weight: 33.33,
            sticky_header: None,
            matches: vec![],
        });
        assert_eq!(p.for_instance(Some("a")), p, "a plain split: everywhere");
        p.candidate_instances = vec!["a".into(), "b".into()];
        assert!(p.validate().is_ok());
        let on = p.for_instance(Some("b"));
        assert_eq!(on.candidate.as_ref().map(|c| c.weight), Some(100.0));
        assert!(on.candidate_instances.is_empty());
        assert_eq!(on.versions().into_iter().collect::<Vec<_>>(), ["1", "2"]);
        for me in [Some("c"), None] {
            let off = p.for_instance(me);
            assert_eq!(off, RoutePolicy::stable_only("1"), "{me:?}");
            assert_eq!(off.versions().into_iter().collect::<Vec<_>>(), ["1"]);
        }
        assert_eq!(
            p.describe(),
            "stable 1; candidate 2 at 33.33%; candidate on instances a, b only"
        );
        p.candidate = None;
        assert!(p.validate().unwrap_err().starts_with("candidate_instances"));
    }

    #[test]
    fn parses_the_documented_json() {
        let p: RoutePolicy = serde_json::from_str(
            r#"{"stable":"1","candidate":{"version":"2","weight":10,"sticky_header":"x-user-id",
                "match":[{"header":"x-region","values":["eu-west"]}]},
                "shadow":{"version":"3","percent":100,"compare":{"output":"probabilities"}}}"#,
        )
        .unwrap();
        assert_eq!(
            p.versions().into_iter().collect::<Vec<_>>(),
            ["1", "2", "3"]
        );
        assert_eq!(p.shadow.unwrap().compare.mode, CompareMode::Class);
        assert!(serde_json::from_str::<RoutePolicy>(r#"{"stable":"1","weights":{}}"#).is_err());
    }
}
