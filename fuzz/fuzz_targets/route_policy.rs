//! Routing policies as `PUT /api/v1/models/{model}/route` takes them.
//!
//! Checks: decoding and validation never panic; a valid policy written back
//! as JSON decodes to the same policy and is still valid.
#![no_main]

use ferry::gateway::policy::RoutePolicy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(policy) = serde_json::from_slice::<RoutePolicy>(data) else {
        return;
    };
    if policy.validate().is_err() {
        return;
    }
    let _ = policy.describe();
    let json = serde_json::to_vec(&policy).expect("a policy serialises");
    let again: RoutePolicy = serde_json::from_slice(&json).unwrap_or_else(|e| {
        panic!(
            "the policy written back does not decode: {e}\n{}",
            String::from_utf8_lossy(&json)
        )
    });
    assert_eq!(again, policy);
    assert!(again.validate().is_ok());
});
