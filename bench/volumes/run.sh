#!/usr/bin/env bash
# Volume I/O next to the host's own filesystem, in one run (as root; see
# crates/agent/examples/bench-volumes.rs): sequential write and read throughput and
# 4 KiB fdatasync latency (p50, p99) on a plain and an encrypted volume, made and
# mounted by the agent's own volume code, and on a directory of the filesystem the
# volume images live on.
#
#   bench/volumes/run.sh                      # 512 MB, 2000 fsyncs, best of 3 rounds
#   BASE=/var/tmp/x SIZE_MB=256 FSYNCS=1000 ROUNDS=2 bench/volumes/run.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
if [[ $(id -u) -ne 0 ]]; then
  echo "bench/volumes: run as root (loop devices, mounts, ext4 encryption keys)" >&2
  exit 1
fi
cargo build --release -q -p aloft-agent --example bench-volumes
TARGET="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
BENCH="$(find "$TARGET" -path "*/release/examples/bench-volumes" -type f -perm -u+x | head -1)"
exec "$BENCH" "${BASE:-/var/tmp/aloft-bench-volumes}" "${SIZE_MB:-512}" "${FSYNCS:-2000}" "${ROUNDS:-3}"
