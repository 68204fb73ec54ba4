//! The client's deadline, from the `grpc-timeout` request header: an ASCII
//! integer of at most 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`),
//! as the gRPC over HTTP/2 specification writes it.

use std::time::Duration;

/// The header a gRPC client sends its deadline in.
pub const HEADER: &str = "grpc-timeout";

/// The time the client gives the call, or `None` when it sent no (valid)
/// deadline.
pub fn parse(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The deadline of a request, from its headers.
pub fn of(headers: &axum::http::HeaderMap) -> Option<Duration> {
    headers
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unit_and_every_malformed_value() {
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse("5n"), Some(Duration::from_nanos(5)));
        for bad in [
            "",
            "S",
            "100",
            "123456789S",
            "1.5S",
            "-1S",
            "10s",
            "+1S",
            "1 S",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
