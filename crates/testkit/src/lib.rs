//! Test support shared by the workspace's test suites: the one way a test skips.
//!
//! A test that cannot run on this machine (no root, a tool missing) calls [`skip`] and
//! returns. Locally that prints why and the test passes; under
//! `ALOFT_REQUIRE_ALL_TESTS=1` (scripts/test.sh, hence CI) it fails instead, so a green
//! run means every test ran.

use std::fmt::Display;

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

#[cfg(test)]
mod tests {
    use super::*;

    /// One test toggles the variable, so no other test in this binary races with it.
    #[test]
    fn skipping_fails_only_when_every_test_must_run() {
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
    }
}
