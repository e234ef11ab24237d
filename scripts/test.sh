#!/usr/bin/env bash
# Sets up and runs the whole test suite, as root (integration tests use network
# namespaces, runc and buildah). ALOFT_REQUIRE_ALL_TESTS=1 turns every test's skip into a
# failure, so a green run means every test ran; then checks the release binary's size.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh --test
export PATH="$HOME/.cargo/bin:$PATH"
source scripts/postgres-for-tests.sh
source scripts/flyctl-for-tests.sh
source scripts/flygo-for-tests.sh

# Every test must run: a test that would skip (no root, a tool missing) fails instead.
export ALOFT_REQUIRE_ALL_TESTS=1

cargo build --workspace --all-targets
cargo test --workspace -- --test-threads=2

# The shipped binary (scripts/run-example.sh builds it): at most 40 MB.
cargo build --release -p aloft
release_binary=target/x86_64-unknown-linux-gnu/release/aloft
release_bytes=$(stat -c %s "$release_binary")
echo "test: release aloft is $((release_bytes / 1024 / 1024)) MB ($release_bytes bytes)"
if (( release_bytes > 40 * 1024 * 1024 )); then
  echo "test: the release aloft is larger than 40 MB" >&2
  exit 1
fi

# The same end-to-end suites with the server's state in PostgreSQL (a database per test).
ALOFT_TEST_STORE=postgres cargo test -p aloft --test walking_skeleton --test deploys --test volumes \
  --test secrets -- --test-threads=2
