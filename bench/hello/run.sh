#!/usr/bin/env bash
# Requests per second on ONE keep-alive connection to the example app (examples/hello):
# directly, through Aloft's proxy, and through nginx as a reverse proxy, side by side.
# One connection shows per-request stalls that many connections hide: an app that writes
# its answer in two pieces waits on Nagle's algorithm and the peer's delayed ACK, 40 ms a
# request (about 23 req/s), whatever proxy is in front.
#
#   bench/hello/run.sh                       # 10 s per measurement, release builds
#   DURATION=5 PROFILE=debug bench/hello/run.sh
#   HELLO_BIN=/path/to/other/hello bench/hello/run.sh   # compare another build of the app
# Needs: nginx wrk (apt-get install -y nginx wrk).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DURATION="${DURATION:-10}"
PROFILE="${PROFILE:-release}"
WORK="$(mktemp -d /tmp/aloft-bench-hello.XXXXXX)"
HELLO=127.0.0.1:18191
ALOFT=127.0.0.1:18190
NGINX=127.0.0.1:18192
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  sleep 0.3
  rm -rf "$WORK"
}
trap cleanup EXIT

for tool in nginx wrk curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install -y nginx wrk)"; exit 1; }
done

echo "== building hello and the proxy ($PROFILE)"
FLAGS=()
[ "$PROFILE" = release ] && FLAGS=(--release)
(cd "$ROOT" && cargo build -q "${FLAGS[@]}" -p hello && cargo build -q "${FLAGS[@]}" -p aloft-proxy --example bench-proxy)
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
find_bin() {
  for candidate in "$TARGET/x86_64-unknown-linux-gnu/$PROFILE/$1" "$TARGET/$PROFILE/$1"; do
    [ -x "$candidate" ] && { echo "$candidate"; return; }
  done
  echo "cannot find $1 under $TARGET" >&2; exit 1
}
HELLO_BIN="${HELLO_BIN:-$(find_bin hello)}"
PROXY_BIN="$(find_bin examples/bench-proxy)"

PORT="${HELLO##*:}" "$HELLO_BIN" > "$WORK/hello.log" 2>&1 &
PIDS+=($!)
BENCH_WORKERS=1 "$PROXY_BIN" "$ALOFT" "$HELLO" > "$WORK/aloft.log" 2>&1 &
PIDS+=($!)
mkdir -p "$WORK/tmp"
cat > "$WORK/nginx.conf" <<NGINX
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $WORK/tmp/body; proxy_temp_path $WORK/tmp/proxy;
  fastcgi_temp_path $WORK/tmp/fcgi; uwsgi_temp_path $WORK/tmp/uwsgi; scgi_temp_path $WORK/tmp/scgi;
  keepalive_requests 1000000;
  upstream be { server $HELLO; keepalive 16; }
  server {
    listen $NGINX;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGINX
nginx -c "$WORK/nginx.conf"
for _ in $(seq 1 100); do
  curl -s -o /dev/null "http://$HELLO/" && curl -s -o /dev/null "http://$ALOFT/" && curl -s -o /dev/null "http://$NGINX/" && break
  sleep 0.1
done

one_connection() {
  wrk -t1 -c1 -d"${DURATION}s" "$1" | awk '/Requests\/sec/ {printf "%.0f", $2}'
}
echo "== one keep-alive connection, wrk -t1 -c1 -d${DURATION}s (req/s)"
direct=$(one_connection "http://$HELLO/")
via_aloft=$(one_connection "http://$ALOFT/")
via_nginx=$(one_connection "http://$NGINX/")
printf "hello directly        %8s\n" "$direct"
printf "hello via aloft proxy %8s\n" "$via_aloft"
printf "hello via nginx       %8s\n" "$via_nginx"
awk -v a="$via_aloft" -v n="$via_nginx" -v d="$direct" 'BEGIN {
  if (n > 0) printf "aloft proxy / nginx   %8.2fx\n", a / n
  if (d > 0) printf "aloft proxy / direct  %8.2fx\n", a / d
}'
