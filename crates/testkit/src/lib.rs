//! Test support shared by the workspace's test suites: the one way a test skips, and the
//! seed a property test runs from.
//!
//! A test that cannot run on this machine (no root, a tool missing) calls [`skip`] and
//! returns. Locally that prints why and the test passes; under
//! `ALOFT_REQUIRE_ALL_TESTS=1` (scripts/test.sh, hence CI) it fails instead, so a green
//! run means every test ran.

use std::fmt::Display;

pub mod netns;

/// Set to `1` to turn every skip into a failure.
pub const REQUIRE_ALL_TESTS: &str = "ALOFT_REQUIRE_ALL_TESTS";

/// Whether skipping is forbidden in this run.
pub fn skipping_forbidden() -> bool {
    std::env::var(REQUIRE_ALL_TESTS).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Records that the calling test cannot run here, and why; the caller returns next.
///
/// # Panics
///
/// When `ALOFT_REQUIRE_ALL_TESTS` is set: then a test that does not run is a failure.
pub fn skip(reason: impl Display) {
    if skipping_forbidden() {
        panic!(
            "this test cannot run here: {reason}\n({REQUIRE_ALL_TESTS} is set, so every test must run: install what is missing, e.g. with scripts/setup.sh --test)"
        );
    }
    eprintln!("skipping: {reason}");
}

/// proptest reads this variable; a run that failed is replayed by setting it.
pub const PROPERTY_SEED: &str = "PROPTEST_RNG_SEED";

/// The seed for a property test: `PROPTEST_RNG_SEED` when set (a replay), otherwise a fresh
/// random one. Either way it is printed, so a failing run's output says how to replay it.
pub fn property_seed() -> u64 {
    let seed = std::env::var(PROPERTY_SEED)
        .ok()
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(fresh_seed);
    eprintln!("property test seed: {seed} (replay with {PROPERTY_SEED}={seed})");
    seed
}

fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|since| since.as_nanos())
            .unwrap_or_default(),
    );
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test toggles the variable, so no other test in this binary races with it.
    #[test]
    fn skips_fail_only_when_every_test_must_run_and_seeds_replay() {
        // SAFETY: the only test in this binary that touches the environment.
        unsafe { std::env::remove_var(REQUIRE_ALL_TESTS) };
        skip("a reason");
        unsafe { std::env::set_var(REQUIRE_ALL_TESTS, "1") };
        let failed = std::panic::catch_unwind(|| skip("tool X is missing"));
        unsafe { std::env::remove_var(REQUIRE_ALL_TESTS) };
        let message = failed.expect_err("a skip must fail under ALOFT_REQUIRE_ALL_TESTS");
        let text = message
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(text.contains("tool X is missing"), "{text}");

        // The seed variable, in the same test for the same reason.
        unsafe { std::env::set_var(PROPERTY_SEED, "12345") };
        assert_eq!(property_seed(), 12345);
        unsafe { std::env::remove_var(PROPERTY_SEED) };
        assert_ne!(property_seed(), property_seed(), "fresh seeds differ");
    }
}
