#!/usr/bin/env bash
# The private-network resolver under dnsperf, side by side with dnsmasq answering the same
# names from a hosts file (the peer), on loopback. Prints queries/s of each and the ratio,
# then how long a machine that starts in the catalog takes to be answered.
#   bench/dns/run.sh [SECONDS]        (needs dnsperf and dnsmasq: scripts/setup.sh --test)
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-10}
for tool in dnsperf dnsmasq; do
  command -v "$tool" >/dev/null || { echo "bench/dns: needs $tool (apt-get install dnsperf dnsmasq-base)" >&2; exit 1; }
done
cargo build --release -q -p aloft-dns --example bench-dns
bin=target/x86_64-unknown-linux-gnu/release/examples/bench-dns
[[ -x $bin ]] || bin=target/release/examples/bench-dns
work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

"$bin" serve 127.0.0.1:5390 200 4 "$work/queries.txt" "$work/hosts.txt" > "$work/aloft.out" &
pids+=($!)
for _ in $(seq 100); do grep -q ready "$work/aloft.out" 2>/dev/null && break; sleep 0.1; done
dnsmasq --keep-in-foreground --port=5391 --listen-address=127.0.0.1 --bind-interfaces \
  --no-resolv --no-hosts --addn-hosts="$work/hosts.txt" --cache-size=10000 --pid-file="$work/dnsmasq.pid" &
pids+=($!)
sleep 0.5

run() { # port -> queries/s
  dnsperf -s 127.0.0.1 -p "$1" -d "$work/queries.txt" -l "$seconds" -c 8 -T 1 -q 200 2>&1 \
    | awk '/Queries per second/ {print $4}'
}
aloft_qps=$(run 5390)
peer_qps=$(run 5391)
echo "aloft-dns  .internal AAAA: ${aloft_qps} queries/s"
echo "dnsmasq    same names:     ${peer_qps} queries/s"
awk -v a="$aloft_qps" -v p="$peer_qps" 'BEGIN { printf "ratio aloft/dnsmasq: %.2f\n", a / p }'
"$bin" update 127.0.0.1:5392
