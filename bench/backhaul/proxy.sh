#!/usr/bin/env bash
# Requests through edge proxy -> backhaul -> worker proxy versus straight to the worker's
# proxy, in one run, on two real hosts: `aloft server` (host A, control plane) and
# `aloft server --join` (host B) in two network namespaces joined by a veth, in one
# WireGuard mesh. examples/hello runs on host B only (host A is cordoned). wrk runs in
# host B's namespace against B's proxy (the peer: no backhaul) and in host A's namespace
# against A's proxy (the machine is on B: every request crosses the mesh), interleaved for
# ROUNDS rounds; medians. CPU per request is the edge process's (proxy and mesh, host A)
# and the worker process's (host B) utime+stime over the run / requests.
#   bench/backhaul/proxy.sh          (as root; ROUNDS, DURATION, CONNECTIONS)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-16}

if [[ $EUID -ne 0 ]]; then
  echo "bench/backhaul/proxy.sh needs root (network namespaces, containers)" >&2
  exit 1
fi
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)" >&2; exit 1; }

cargo build --release -q -p aloft -p hello
bin=$PWD/target/x86_64-unknown-linux-gnu/release
work=$(mktemp -d /tmp/aloft-bench-backhaul.XXXXXX)
# Machines run as an unprivileged host user: they must pass through the data dirs.
chmod 755 "$work"
ns_a=aloft-bench-a-$$
ns_b=aloft-bench-b-$$
server_a=
server_b=

cleanup() {
  for pid in $server_b $server_a; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in $server_b $server_a; do
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  # The machines (their processes, namespaces and mounts) outlive their host's process.
  for machine in "$work"/a/agent/machines/* "$work"/b/agent/machines/*; do
    [[ -e $machine ]] || continue
    ns=aloft-$(basename "$machine")
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  ip netns del "$ns_a" 2>/dev/null || true
  ip netns del "$ns_b" 2>/dev/null || true
  awk -v root="$work" 'index($5, root) == 1 {print $5}' /proc/self/mountinfo | sort -r |
    while read -r mount; do umount -l "$mount" 2>/dev/null || true; done
  losetup -j "$work" 2>/dev/null | cut -d: -f1 | while read -r dev; do losetup -d "$dev" || true; done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

ip netns add "$ns_a"
ip netns add "$ns_b"
ip link add "bhA$$" type veth peer name "bhB$$"
ip link set "bhA$$" netns "$ns_a"
ip link set "bhB$$" netns "$ns_b"
ip -n "$ns_a" addr add 10.77.0.1/24 dev "bhA$$"
ip -n "$ns_b" addr add 10.77.0.2/24 dev "bhB$$"
for ns in "$ns_a" "$ns_b"; do
  ip -n "$ns" link set lo up
done
ip -n "$ns_a" link set "bhA$$" up
ip -n "$ns_b" link set "bhB$$" up

in_a() { nsenter --net="/run/netns/$ns_a" "$@"; }
in_b() { nsenter --net="/run/netns/$ns_b" "$@"; }
export HOME=$work/home
mkdir -p "$HOME"
aloft() { in_a "$bin/aloft" "$@"; }

# nsenter execs aloft: $! is the server's own pid (its CPU time is measured).
nsenter --net="/run/netns/$ns_a" "$bin/aloft" server --data-dir "$work/a" --driver container \
  --api-listen 10.77.0.1:4280 --mesh-listen 10.77.0.1:51820 >"$work/a.log" 2>&1 &
server_a=$!
for _ in $(seq 1 300); do
  aloft apps list >/dev/null 2>&1 && break
  kill -0 "$server_a" 2>/dev/null || { cat "$work/a.log" >&2; exit 1; }
  sleep 0.1
done
host_a=$(aloft hosts list --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
token=$(aloft tokens create host)
nsenter --net="/run/netns/$ns_b" "$bin/aloft" server --join http://10.77.0.1:4280 --token "$token" \
  --data-dir "$work/b" --agent-listen 10.77.0.2:4281 --mesh-listen 10.77.0.2:51820 \
  --driver container >"$work/b.log" 2>&1 &
server_b=$!
for _ in $(seq 1 600); do
  up=$(aloft hosts list --json | python3 -c 'import json,sys; print(sum(h["status"] == "up" for h in json.load(sys.stdin)))')
  [[ $up == 2 ]] && break
  kill -0 "$server_b" 2>/dev/null || { cat "$work/b.log" >&2; exit 1; }
  sleep 0.1
done
[[ $up == 2 ]] || { echo "host B did not join" >&2; cat "$work/b.log" >&2; exit 1; }

aloft hosts cordon "$host_a" >/dev/null
app_dir=$work/hello
mkdir -p "$app_dir"
cp examples/hello/Dockerfile examples/hello/fly.toml examples/hello/.dockerignore "$app_dir/"
cp "$bin/hello" "$app_dir/hello"
aloft apps create hello >/dev/null
(cd "$app_dir" && aloft deploy --ha=false >"$work/deploy.log" 2>&1) || { cat "$work/deploy.log" >&2; exit 1; }

# Both proxies serve the machine before measuring.
for ns in "$ns_a" "$ns_b"; do
  for _ in $(seq 1 300); do
    nsenter --net="/run/netns/$ns" curl -sf -o /dev/null -H 'Host: hello.localhost' \
      http://127.0.0.1:8080/ && break
    sleep 0.1
  done
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
ticks_per_sec=$(getconf CLK_TCK)

# One wrk run from namespace $1: prints "req_per_sec p50_us edge_cpu_us_per_req worker_cpu_us_per_req".
measure() {
  local ns=$1
  local before_a before_b out
  before_a=$(cpu_ticks "$server_a")
  before_b=$(cpu_ticks "$server_b")
  out=$(nsenter --net="/run/netns/$ns" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency \
    -H 'Host: hello.localhost' http://127.0.0.1:8080/)
  echo "$out" >>"$work/wrk.log"
  local after_a after_b
  after_a=$(cpu_ticks "$server_a")
  after_b=$(cpu_ticks "$server_b")
  python3 - "$out" "$((after_a - before_a))" "$((after_b - before_b))" "$ticks_per_sec" <<'EOF'
import re, sys
out, ticks_a, ticks_b, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def to_us(text):
    found = re.match(r"([\d.]+)(us|ms|s)", text)
    if not found:
        sys.exit(f"cannot read a latency from {text!r} in:\n{out}")
    value, unit = found.groups()
    return float(value) * {"us": 1, "ms": 1e3, "s": 1e6}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
total = int(re.search(r"(\d+) requests in", out).group(1))
p50 = to_us(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1))
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
if errors:
    sys.exit(f"wrk saw {errors.group(1)} failed responses:\n{out}")
per_req = lambda ticks: ticks / hz * 1e6 / max(total, 1)
print(f"{rps:.0f} {p50:.0f} {per_req(ticks_a):.1f} {per_req(ticks_b):.1f}")
EOF
}

echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "wrk -t1 -c$CONNECTIONS -d${DURATION}s, $ROUNDS rounds, medians"
direct=()
backhaul=()
for round in $(seq 1 "$ROUNDS"); do
  direct+=("$(measure "$ns_b")")
  backhaul+=("$(measure "$ns_a")")
  echo "round $round: straight to the worker's proxy: ${direct[-1]} | edge -> backhaul -> worker: ${backhaul[-1]}"
done

python3 - "${#direct[@]}" "${direct[@]}" "${backhaul[@]}" <<'EOF'
import statistics, sys
n = int(sys.argv[1])
rows = [list(map(float, r.split())) for r in sys.argv[2:]]
direct, backhaul = rows[:n], rows[n:]
med = lambda rows, i: statistics.median(r[i] for r in rows)
print()
print("| path | req/s | p50 us | edge CPU us/req | worker CPU us/req |")
print("|---|---|---|---|---|")
for name, rows in [("straight to the worker's proxy", direct), ("edge -> backhaul -> worker", backhaul)]:
    print(f"| {name} | {med(rows, 0):.0f} | {med(rows, 1):.0f} | {med(rows, 2):.1f} | {med(rows, 3):.1f} |")
print()
print(f"backhaul / direct: req/s {med(backhaul, 0) / med(direct, 0):.2f}x (target >= 0.7x), "
      f"added p50 {med(backhaul, 1) - med(direct, 1):.0f} us, "
      f"edge + worker CPU per request {med(backhaul, 2) + med(backhaul, 3):.1f} us "
      f"against {med(direct, 3):.1f} us straight")
EOF
