//! Rollout specs as `ferry apply` and `POST /api/v1/rollouts` take them
//! (YAML, or JSON, which is YAML too).
//!
//! Checks: parsing never panics (a spec or a reason); an accepted spec
//! describes itself, and written back as JSON (as the API shows it) it
//! parses to the same spec.
#![no_main]

use ferry::spec::RolloutSpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(spec) = RolloutSpec::from_yaml(text) else {
        return;
    };
    let _ = spec.checks();
    let json = serde_json::to_string(&spec).expect("a spec serialises");
    let again = RolloutSpec::from_yaml(&json)
        .unwrap_or_else(|e| panic!("the spec written back does not parse: {e}\n{json}"));
    assert_eq!(again, spec, "{json}");
});
