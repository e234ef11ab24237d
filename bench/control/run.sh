#!/usr/bin/env bash
# Control-plane scale benchmark: 10,000 machines in one org (see src/main.rs).
#   bench/control/run.sh [--machines N] [--concurrency C]
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p aloft-bench-control
exec target/x86_64-unknown-linux-gnu/release/aloft-bench-control "$@"
