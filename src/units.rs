//! Durations written with units everywhere (`500ms`, `30s`, `5m`), in the CLI,
//! the API and specs alike.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration that reads and writes as `500ms`, `2s`, `5m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn parse(s: &str) -> Result<HumanDuration, String> {
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|e| {
                format!(
                    "duration {s:?} is not valid ({e}); write it with a unit, e.g. 500ms, 2s, 5m"
                )
            })
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl std::str::FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        HumanDuration::parse(s)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HumanDuration::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The wall clock in Unix milliseconds: the one place Ferry reads it (pure
/// logic, strategies and analysis, is given the time instead).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The wall clock in Unix seconds (metric buckets).
pub fn now_secs() -> u64 {
    now_ms() / 1000
}

/// Now, as the RFC 3339 timestamp Ferry stores and shows (UTC, milliseconds).
pub fn now_rfc3339() -> String {
    rfc3339_of_ms(now_ms())
}

/// A stored RFC 3339 timestamp in Unix milliseconds (the inverse of
/// [`rfc3339_of_ms`]); `None` when it is not one.
pub fn ms_of_rfc3339(at: &str) -> Option<u64> {
    humantime::parse_rfc3339(at)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
}

/// A time in Unix milliseconds as Ferry shows it (RFC 3339, UTC, milliseconds).
pub fn rfc3339_of_ms(ms: u64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_timestamp_reads_back_as_its_milliseconds() {
        let ms = 1_764_700_000_123;
        assert_eq!(ms_of_rfc3339(&rfc3339_of_ms(ms)), Some(ms));
        assert_eq!(ms_of_rfc3339("yesterday"), None);
    }

    #[test]
    fn round_trips_with_units_and_explains_mistakes() {
        assert_eq!(
            HumanDuration::parse("500ms").unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!(HumanDuration::parse("5m").unwrap().to_string(), "5m");
        assert!(
            HumanDuration::parse("5")
                .unwrap_err()
                .contains("with a unit")
        );
    }
}
