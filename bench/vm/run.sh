#!/usr/bin/env bash
# microVM benchmark on this host, as root (see crates/agent/examples/bench-vm.rs): cold
# start of a stopped machine until the example app accepts TCP, median and p95, with the
# accelerator used and QEMU's RSS per machine, next to the same under the container driver.
#
#   bench/vm/run.sh                 # 10 starts each, accelerator probed (KVM if it boots)
#   STARTS=20 ACCEL=tcg bench/vm/run.sh
# Needs: qemu-system-x86 qemu-utils linux-image-cloud-amd64 e2fsprogs lz4 runc buildah
# (scripts/setup.sh --test).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
if [[ $(id -u) -ne 0 ]]; then
  echo "bench/vm: run as root (network namespaces, QEMU's jail, runc)" >&2
  exit 1
fi
# Two runs: `--example` narrows a run to examples.
cargo build --release -q -p aloft -p hello
cargo build --release -q -p aloft-agent --example bench-vm
TARGET="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
find_bin() { find "$TARGET" -path "*/release/$1" -type f -perm -u+x | head -1; }
exec "$(find_bin examples/bench-vm)" "$(find_bin aloft)" "$(find_bin hello)" "$ROOT/examples/hello"
