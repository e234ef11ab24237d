#!/usr/bin/env bash
# Machine benchmarks on this host, as root (see crates/agent/examples/bench-machines.rs):
#   (a) start latency of a stopped machine until the example app accepts TCP, median and
#       p95, next to the bare OCI runtime starting the same root filesystem (the floor);
#   (b) create with the image cached;
#   (c) density: DENSITY idle example machines, platform RSS and memory per machine.
#
#   bench/agent/run.sh                       # 50 starts, 20 creates, 200 machines
#   STARTS=20 CREATES=10 DENSITY=50 bench/agent/run.sh
# Needs: runc buildah iproute2 (scripts/setup.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
if [[ $(id -u) -ne 0 ]]; then
  echo "bench/agent: run as root (network namespaces, runc, overlay mounts)" >&2
  exit 1
fi
cargo build --release -q -p aloft -p hello
cargo build --release -q -p aloft-agent --example bench-machines
TARGET="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
find_bin() { find "$TARGET" -path "*/release/$1" -type f -perm -u+x | head -1; }
ALOFT="$(find_bin aloft)"
HELLO="$(find_bin hello)"
BENCH="$(find_bin examples/bench-machines)"
exec "$BENCH" "$ALOFT" "$HELLO" "$ROOT/examples/hello"
