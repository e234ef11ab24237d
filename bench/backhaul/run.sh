#!/usr/bin/env bash
# The backhaul's mesh between two hosts (network namespaces joined by a veth): bulk TCP
# throughput and 64-byte request/response latency between machine addresses over the
# Aloft mesh, versus the bare veth, versus wireguard-go (the peer) between the same
# namespaces, interleaved in one run. Needs root; wireguard-go + wireguard-tools for the
# peer row (scripts/setup.sh --test installs them).
#   bench/backhaul/run.sh            (ROUNDS, BULK_MB, REQUESTS in the environment)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p aloft-wireguard --example bench-mesh
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
exec target/x86_64-unknown-linux-gnu/release/examples/bench-mesh
