#!/usr/bin/env bash
# Deploy speed: a change to the example app (one image layer changed) deployed to 3
# machines with `aloft deploy`, timed from the command's start until every machine is on
# the new release and healthy (the command returns only then; the script checks it).
# The image build's share is shown separately, and side by side with the same change
# built and pushed by plain buildah (the peer: what a deploy has to do at the least).
#
#   bench/deploy/run.sh              # 3 rounds per strategy
#   ROUNDS=5 bench/deploy/run.sh
#
# Needs root (a network namespace, runc), buildah, iproute2, curl. Target: under 5 s for
# 3 machines with the rolling strategy on this machine.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
ROUNDS="${ROUNDS:-3}"
MACHINES="${MACHINES:-3}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
WORK="$(mktemp -d /tmp/aloft-deploy-bench.XXXXXX)"
NETNS="aloft-bench-$$"
SERVER_PID=""

cleanup() {
  if [ -n "$SERVER_PID" ]; then
    # The server stops its machines on SIGTERM; wait for that before removing anything.
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  ip netns del "$NETNS" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || { echo "run as root (network namespaces, runc)"; exit 1; }
for tool in buildah ip nsenter curl runc; do
  command -v "$tool" >/dev/null || { echo "missing $tool (scripts/setup.sh --test installs it)"; exit 1; }
done

echo "== building aloft and the example app (release)"
(cd "$ROOT" && cargo build --release -q -p aloft -p hello)
BIN="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release"
[ -x "$BIN/aloft" ] || BIN="$CARGO_TARGET_DIR/release"

ip netns add "$NETNS"
ip -n "$NETNS" link set lo up
in_ns() { HOME="$WORK/home" nsenter --net="/run/netns/$NETNS" "$@"; }
mkdir -p "$WORK/home" "$WORK/app"
# Started directly (not through a shell function) so $! is the server itself.
HOME="$WORK/home" nsenter --net="/run/netns/$NETNS" "$BIN/aloft" server --data-dir "$WORK/data" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do in_ns "$BIN/aloft" apps list >/dev/null 2>&1 && break; sleep 0.1; done
in_ns "$BIN/aloft" apps create bench >/dev/null

cp "$BIN/hello" "$WORK/app/hello"
cat >"$WORK/app/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY hello /hello
COPY version.txt /version.txt
CMD ["/hello"]
DOCKERFILE
cat >"$WORK/app/fly.toml" <<'TOML'
app = "bench"
primary_region = "local"

[env]
  PORT = "8080"

[http_service]
  internal_port = 8080
  auto_stop_machines = "off"
  auto_start_machines = false

  [[http_service.checks]]
    grace_period = "1s"
    interval = "1s"
    timeout = "2s"
    method = "GET"
    path = "/"
TOML

deploy() { (cd "$WORK/app" && in_ns "$BIN/aloft" deploy "$@"); }

echo "== first deploy and scale to $MACHINES machines"
echo "v0" >"$WORK/app/version.txt"
deploy >/dev/null
in_ns "$BIN/aloft" scale count "$MACHINES" -a bench --yes >/dev/null

now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.3f\", $1 }"; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

declare -A TOTAL BUILD
round=0
for strategy in rolling bluegreen immediate; do
  totals=(); builds=()
  for _ in $(seq "$ROUNDS"); do
    round=$((round + 1))
    echo "v$round" >"$WORK/app/version.txt"
    start=$(now)
    output=$(deploy --strategy "$strategy")
    end=$(now)
    total=$(calc "$end - $start")
    build=$(echo "$output" | sed -n 's/^--> Image built and pushed in \([0-9.]*\)s$/\1/p')
    release=$(echo "$output" | sed -n 's/^Release v\([0-9]*\) of bench deployed$/\1/p')
    # Every machine on the new release and started when the command returns.
    listing=$(in_ns "$BIN/aloft" machine list -a bench --json)
    on_release=$(grep -c "\"fly_release_version\": \"$release\"" <<<"$listing" || true)
    started=$(grep -c '"state": "started"' <<<"$listing" || true)
    if [ "$on_release" != "$MACHINES" ] || [ "$started" != "$MACHINES" ]; then
      echo "round $round ($strategy): $on_release machine(s) on v$release and $started started, expected $MACHINES"; exit 1
    fi
    served=$(in_ns curl -s -o /dev/null -w '%{http_code}' -H 'Host: bench.localhost' http://127.0.0.1:8080/)
    [ "$served" = 200 ] || { echo "round $round: the app answers $served"; exit 1; }
    printf '  %-9s round %d: %.2f s total, image build and push %.2f s\n' "$strategy" "$round" "$total" "$build"
    totals+=("$total"); builds+=("$build")
  done
  TOTAL[$strategy]=$(printf '%s\n' "${totals[@]}" | median)
  BUILD[$strategy]=$(printf '%s\n' "${builds[@]}" | median)
done

echo "== peer: the same one-layer change built and pushed with plain buildah"
TOKEN=$(in_ns "$BIN/aloft" auth token)
STORAGE="$WORK/buildah"
peer=()
for i in $(seq "$ROUNDS"); do
  echo "peer$i" >"$WORK/app/version.txt"
  start=$(now)
  in_ns buildah --storage-driver vfs --root "$STORAGE/root" --runroot "$STORAGE/run" bud -q --isolation chroot --layers \
    -t "127.0.0.1:4280/bench:peer$i" "$WORK/app" >/dev/null
  in_ns buildah --storage-driver vfs --root "$STORAGE/root" --runroot "$STORAGE/run" push -q --tls-verify=false \
    --creds "x:$TOKEN" "127.0.0.1:4280/bench:peer$i" >/dev/null
  end=$(now)
  peer+=("$(calc "$end - $start")")
done
PEER=$(printf '%s\n' "${peer[@]}" | median)

echo
echo "Deploy of a one-layer change to $MACHINES machines (median of $ROUNDS):"
printf '  %-10s %8s %10s %10s %14s\n' strategy total build rollout "total/peer"
for strategy in rolling bluegreen immediate; do
  t=${TOTAL[$strategy]}; b=${BUILD[$strategy]}
  printf '  %-10s %7.2fs %9.2fs %9.2fs %13.2fx\n' "$strategy" "$t" "$b" "$(calc "$t - $b")" "$(calc "$t / $PEER")"
done
printf '  %-10s %7.2fs   (plain buildah bud + push of the same change)\n' peer "$PEER"
printf '  Aloft build step / plain buildah: %.2fx\n' "$(calc "${BUILD[rolling]} / $PEER")"
if [ "$(calc "${TOTAL[rolling]} < 5")" = "1.000" ]; then
  echo "  rolling: under the 5 s target"
else
  echo "  rolling: OVER the 5 s target"
fi
