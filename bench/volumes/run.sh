#!/usr/bin/env bash
# Volume I/O next to the host's own filesystem, in one run (as root; see
# crates/agent/examples/bench-volumes.rs): sequential write and read throughput and
# 4 KiB fdatasync latency (p50, p99) on a plain and an encrypted volume, made and
# mounted by the agent's own volume code, and on a directory of the filesystem the
# volume images live on.
#
# Then the microVM figures (MICROVM=0 skips them): bench/volumes/guest-io.rs, built
# static, measures inside microVMs started by `aloft server --driver microvm` (the
# ignored test bench_microvm_volume_io in crates/cli/tests/microvm_volumes.rs) the VM's
# root disk, an encrypted (LUKS in QEMU) and a plain volume; VM_SIZE_MB, VM_FSYNCS and
# VM_ROUNDS size it (TCG is slow).
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
echo "load average at the start: $(cut -d' ' -f1-3 /proc/loadavg)"
"$BENCH" "${BASE:-/var/tmp/aloft-bench-volumes}" "${SIZE_MB:-512}" "${FSYNCS:-2000}" "${ROUNDS:-3}"
if [[ "${MICROVM:-1}" == 0 ]]; then
  exit 0
fi
GUEST_IO_DIR="$(mktemp -d)"
trap 'rm -rf "$GUEST_IO_DIR"' EXIT
rustc -O -C target-feature=+crt-static --edition 2021 -o "$GUEST_IO_DIR/guest-io" bench/volumes/guest-io.rs
echo "load average before the microVM figures: $(cut -d' ' -f1-3 /proc/loadavg)"
ALOFT_BENCH_GUEST_IO="$GUEST_IO_DIR/guest-io" SIZE_MB="${VM_SIZE_MB:-128}" \
  FSYNCS="${VM_FSYNCS:-300}" ROUNDS="${VM_ROUNDS:-2}" \
  cargo test -q -p aloft --test microvm_volumes -- --ignored --nocapture --exact bench_microvm_volume_io 2>/dev/null \
  | grep -E '^(microVM|target)'
