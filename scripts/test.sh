#!/usr/bin/env bash
# Sets up and runs the whole test suite (as root: integration tests use network
# namespaces, runc and buildah; without root they skip with a message).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh --test
export PATH="$HOME/.cargo/bin:$PATH"
source scripts/postgres-for-tests.sh

cargo build --workspace --all-targets
cargo test --workspace -- --test-threads=2
