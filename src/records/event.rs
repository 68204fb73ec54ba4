//! What an event records, as a closed list: every kind this build writes is
//! a variant, named once by serde (the string in the JSON answers, the event
//! history, the `events.kind` column and notify webhooks' `events`). A kind
//! this build does not know — written by a newer build into the same
//! database — is kept as it was read ([`EventKind::Other`]), so reading
//! history never fails on it and it is shown as stored.

use serde::{Deserialize, Serialize};

use super::variant::variant_name;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    // What exists and serves (the registry and the controller).
    VersionRegistered,
    StableSet,
    SettingsChanged,
    VersionRemoved,
    ModelLoaded,
    ModelUnloaded,
    VersionLoaded,
    VersionUnloaded,
    RouteChanged,
    // Rollouts.
    RolloutStarted,
    RollbackStarted,
    Step,
    Paused,
    Resumed,
    Promoted,
    QaPassed,
    BatchFailed,
    AnalysisPassed,
    AnalysisFailed,
    AnalysisInconclusive,
    Aborted,
    Failed,
    Succeeded,
    RolledBack,
    /// A kind this build does not know, as stored.
    #[serde(untagged)]
    Other(String),
}

impl EventKind {
    /// The kind as stored and shown (`rolled_back`).
    pub fn as_str(&self) -> &str {
        match self {
            EventKind::Other(s) => s,
            known => variant_name(known).expect("every known event kind is a unit variant"),
        }
    }

    /// The kind named `text`: a known one, else kept as [`EventKind::Other`].
    pub fn parse(text: &str) -> EventKind {
        use serde::de::IntoDeserializer;
        let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
            text.into_deserializer();
        EventKind::deserialize(de).unwrap_or_else(|_| EventKind::Other(text.to_string()))
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for EventKind {
    fn from(text: &str) -> EventKind {
        EventKind::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::EventKind;

    #[test]
    fn kinds_read_and_print_as_the_store_and_the_api_hold_them() {
        for (kind, text) in [
            (EventKind::RolledBack, "rolled_back"),
            (EventKind::AnalysisInconclusive, "analysis_inconclusive"),
            (EventKind::QaPassed, "qa_passed"),
            (EventKind::RouteChanged, "route_changed"),
        ] {
            assert_eq!(kind.to_string(), text);
            assert_eq!(EventKind::parse(text), kind);
            assert_eq!(serde_json::to_value(&kind).unwrap(), text);
            assert_eq!(
                serde_json::from_value::<EventKind>(text.into()).unwrap(),
                kind
            );
        }
    }

    /// A newer build's kind in the same database reads back as it was
    /// stored, and is written out unchanged.
    #[test]
    fn an_unknown_kind_is_kept_not_refused() {
        let kind = EventKind::parse("canary_mirrored");
        assert_eq!(kind, EventKind::Other("canary_mirrored".into()));
        assert_eq!(kind.to_string(), "canary_mirrored");
        assert_eq!(serde_json::to_value(&kind).unwrap(), "canary_mirrored");
        assert_eq!(
            serde_json::from_value::<EventKind>("canary_mirrored".into()).unwrap(),
            kind
        );
    }
}
