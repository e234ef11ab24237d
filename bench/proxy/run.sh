#!/usr/bin/env bash
# Benchmark of Aloft's edge proxy against nginx as a reverse proxy, side by side on this
# machine, with the same backend (an nginx answering 'hello').
#
#   bench/proxy/run.sh            # full run (10 s per measurement)
#   DURATION=5 bench/proxy/run.sh # shorter
#
# Prints req/s and p99 of wrk (HTTP/1.1 keep-alive, 64 connections), h2load (HTTP/2,
# prior knowledge), new TLS handshakes per second (openssl s_time -new, 2 clients), the
# proxy's RSS with 10,000 idle client connections, and the Aloft/nginx ratios.
# Needs: nginx wrk nghttp2-client openssl python3 (apt-get install -y nginx wrk nghttp2-client).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DURATION="${DURATION:-10}"
# Measurements alternate nginx/Aloft ROUNDS times; the median of each side is reported,
# so a burst of load from elsewhere on the machine does not favour one side.
ROUNDS="${ROUNDS:-3}"
# On a busy machine (other builds running), BENCH_NICE=-15 (as root) keeps the scheduler
# from interleaving unrelated work into the measurements; both sides get the same priority.
NICE=()
if [ -n "${BENCH_NICE:-}" ]; then NICE=(nice -n "$BENCH_NICE"); fi
WORK="$(mktemp -d /tmp/aloft-bench.XXXXXX)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/bench-proxy}"
BACKEND=127.0.0.1:18081
NGINX_HTTP=127.0.0.1:18080
NGINX_H2=127.0.0.1:18082
NGINX_TLS=127.0.0.1:18444
ALOFT_HTTP=127.0.0.1:18090
ALOFT_TLS_IP=127.0.0.3
ALOFT_TLS_PORT=18443
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$WORK/backend.pid" ] && kill "$(cat "$WORK/backend.pid")" 2>/dev/null || true
  [ -f "$WORK/proxy.pid" ] && kill "$(cat "$WORK/proxy.pid")" 2>/dev/null || true
  sleep 0.3
  rm -rf "$WORK"
}
trap cleanup EXIT

for tool in nginx wrk h2load openssl python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install -y nginx wrk nghttp2-client)"; exit 1; }
done

echo "== building the proxy (release)"
(cd "$ROOT" && cargo build --release -q -p aloft-proxy --example bench-proxy)
PROXY_BIN="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/examples/bench-proxy"
[ -x "$PROXY_BIN" ] || PROXY_BIN="$CARGO_TARGET_DIR/release/examples/bench-proxy"

# One ECDSA P-256 certificate for nginx (Aloft serves its own P-256 certificate).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=bench.test -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null

mkdir -p "$WORK/tmp"
common() {
  cat <<EOF
worker_processes 1;
pid $WORK/$1.pid;
error_log $WORK/$1.err warn;
events { worker_connections 20000; }
http {
  access_log off;
  client_body_temp_path $WORK/tmp/body; proxy_temp_path $WORK/tmp/proxy;
  fastcgi_temp_path $WORK/tmp/fcgi; uwsgi_temp_path $WORK/tmp/uwsgi; scgi_temp_path $WORK/tmp/scgi;
  keepalive_requests 1000000;
EOF
}
{ common backend; cat <<EOF
  server { listen $BACKEND; location / { return 200 'hello'; } }
}
EOF
} > "$WORK/backend.conf"
{ common proxy; cat <<EOF
  upstream be { server $BACKEND; keepalive 128; }
  map \$https \$forwarded_ssl { on on; default off; }
  server {
    listen $NGINX_HTTP;
    listen $NGINX_H2 http2;
    listen $NGINX_TLS ssl;
    ssl_certificate $WORK/cert.pem; ssl_certificate_key $WORK/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache off; ssl_session_tickets off;
    # The forwarding headers Aloft's proxy adds (spec/platform.md §14), so both apps parse
    # the same request and both clients the same response.
    location / {
      proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host \$http_host;
      proxy_set_header Fly-Client-IP \$remote_addr;
      proxy_set_header Fly-Forwarded-Port \$server_port;
      proxy_set_header Fly-Region bench;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Ssl \$forwarded_ssl;
      proxy_set_header X-Forwarded-Port \$server_port;
      proxy_set_header Via "1.1 nginx";
      add_header Via "1.1 nginx";
      add_header Fly-Request-Id \$request_id;
    }
  }
}
EOF
} > "$WORK/proxy.conf"

"${NICE[@]}" nginx -c "$WORK/backend.conf"
"${NICE[@]}" nginx -c "$WORK/proxy.conf"
ulimit -n 20000 || true
BENCH_WORKERS=1 "${NICE[@]}" "$PROXY_BIN" "$ALOFT_HTTP" "$BACKEND" "$ALOFT_TLS_IP" "$ALOFT_TLS_PORT" > "$WORK/aloft.log" 2>&1 &
ALOFT_PID=$!
PIDS+=("$ALOFT_PID")
for _ in $(seq 1 100); do
  curl -s -o /dev/null "http://$ALOFT_HTTP/" && curl -s -o /dev/null "http://$NGINX_HTTP/" && break
  sleep 0.1
done
curl -sf "http://$ALOFT_HTTP/" >/dev/null || { echo "aloft proxy not answering"; cat "$WORK/aloft.log"; exit 1; }
# The proxy nginx's worker processes (children of its master).
mapfile -t NGINX_PROXY_PIDS < <(pgrep -P "$(cat "$WORK/proxy.pid")")

# CPU time (clock ticks) used so far by a set of processes.
cpu_ticks() {
  local total=0 pid t
  for pid in "$@"; do
    t="$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)"
    total=$((total + t))
  done
  echo "$total"
}
TICK="$(getconf CLK_TCK)"

# wrk output → "rps p99_ms cpu_us_per_request" (CPU of the proxy under test: robust even
# when other work shares the machine).
wrk_run() {
  local out rps p99 before after reqs
  before="$(cpu_ticks "${@:2}")"
  out="$("${NICE[@]}" wrk -t2 -c64 -d"${DURATION}s" --latency "$1")"
  after="$(cpu_ticks "${@:2}")"
  reqs="$(awk '/requests in/ {print $1}' <<<"$out")"
  rps="$(awk '/Requests\/sec/ {print $2}' <<<"$out")"
  p99="$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub("us","",v); v=v/1000} else if (v ~ /ms$/) {sub("ms","",v)} else if (v ~ /s$/) {sub("s","",v); v=v*1000}; print v}' <<<"$out")"
  echo "$rps $p99 $(awk -v t=$((after - before)) -v n="$reqs" -v hz="$TICK" 'BEGIN { if (n > 0) printf "%.2f", t * 1e6 / hz / n; else print 0 }')"
}
h2_run() {
  local out
  out="$("${NICE[@]}" h2load -c64 -m10 -t2 -D"$DURATION" "$1" 2>/dev/null)"
  awk '/^finished in/ {gsub(",","",$4); print $4}' <<<"$out"
}
tls_pair() {
  local f1="$WORK/tls1" f2="$WORK/tls2"
  ("${NICE[@]}" openssl s_time -connect "$1" -new -time "$DURATION" 2>/dev/null | awk '/connections in .* real seconds/ {print $1/$4}' | tail -1 > "$f1") &
  local pa=$!
  ("${NICE[@]}" openssl s_time -connect "$1" -new -time "$DURATION" 2>/dev/null | awk '/connections in .* real seconds/ {print $1/$4}' | tail -1 > "$f2") &
  local pb=$!
  wait $pa $pb || true
  awk '{s+=$1} END {printf "%.0f\n", s}' "$f1" "$f2"
}

echo "== RSS of the Aloft proxy (fresh process) with 10,000 idle client connections"
python3 - "$ALOFT_HTTP" "$ALOFT_PID" "$WORK/rss" <<'PY'
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
pid, out = sys.argv[2], sys.argv[3]
def rss():
    return int([l for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS")][0].split()[1])
before = rss()
socks = []
for i in range(10000):
    s = socket.socket()
    s.connect((host, int(port)))
    socks.append(s)
time.sleep(1.0)
idle = rss()
# The same connections after one request each (keep-alive, idle again).
for s in socks:
    s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    s.recv(4096)
time.sleep(1.0)
keepalive = rss()
open(out, "w").write(f"{before} {idle} {keepalive}\n")
for s in socks:
    s.close()
PY
read -r RSS_BEFORE RSS_IDLE RSS_KA < "$WORK/rss"
printf "aloft  RSS %d KiB at start, %d KiB (%.1f MiB) with 10,000 idle connections, %d KiB (%.1f MiB) once each made one request\n" \
  "$RSS_BEFORE" "$RSS_IDLE" "$(echo "$RSS_IDLE/1024" | bc -l)" "$RSS_KA" "$(echo "$RSS_KA/1024" | bc -l)"

median() { sort -g | awk '{a[NR]=$1} END { if (NR == 0) print 0; else if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }

echo "== HTTP/1.1 keep-alive, wrk -t2 -c64 -d${DURATION}s, $ROUNDS rounds (median)"
: > "$WORK/n_rps"; : > "$WORK/n_p99"; : > "$WORK/a_rps"; : > "$WORK/a_p99"; : > "$WORK/n_cpu"; : > "$WORK/a_cpu"
for _ in $(seq 1 "$ROUNDS"); do
  read -r r p c < <(wrk_run "http://$NGINX_HTTP/" "${NGINX_PROXY_PIDS[@]}"); echo "$r" >> "$WORK/n_rps"; echo "$p" >> "$WORK/n_p99"; echo "$c" >> "$WORK/n_cpu"
  read -r r p c < <(wrk_run "http://$ALOFT_HTTP/" "$ALOFT_PID"); echo "$r" >> "$WORK/a_rps"; echo "$p" >> "$WORK/a_p99"; echo "$c" >> "$WORK/a_cpu"
  echo "  round: nginx $(tail -1 "$WORK/n_rps") req/s p99 $(tail -1 "$WORK/n_p99") ms $(tail -1 "$WORK/n_cpu") us CPU/req | aloft $(tail -1 "$WORK/a_rps") req/s p99 $(tail -1 "$WORK/a_p99") ms $(tail -1 "$WORK/a_cpu") us CPU/req"
done
N_RPS="$(median < "$WORK/n_rps")"; N_P99="$(median < "$WORK/n_p99")"; N_CPU="$(median < "$WORK/n_cpu")"
A_RPS="$(median < "$WORK/a_rps")"; A_P99="$(median < "$WORK/a_p99")"; A_CPU="$(median < "$WORK/a_cpu")"
printf "nginx  %10.0f req/s  p99 %6.2f ms  %6.2f us CPU/request\naloft  %10.0f req/s  p99 %6.2f ms  %6.2f us CPU/request\n" \
  "$N_RPS" "$N_P99" "$N_CPU" "$A_RPS" "$A_P99" "$A_CPU"

echo "== HTTP/2 (h2c prior knowledge), h2load -c64 -m10 -D${DURATION}, $ROUNDS rounds (median)"
: > "$WORK/n_h2"; : > "$WORK/a_h2"
for _ in $(seq 1 "$ROUNDS"); do
  h2_run "http://$NGINX_H2/" >> "$WORK/n_h2"
  h2_run "http://$ALOFT_HTTP/" >> "$WORK/a_h2"
done
N_H2="$(median < "$WORK/n_h2")"; A_H2="$(median < "$WORK/a_h2")"
printf "nginx  %10.0f req/s\naloft  %10.0f req/s\n" "$N_H2" "$A_H2"

echo "== new TLS handshakes per second (openssl s_time -new, 2 clients), $ROUNDS rounds (median)"
: > "$WORK/n_tls"; : > "$WORK/a_tls"
for _ in $(seq 1 "$ROUNDS"); do
  tls_pair "$NGINX_TLS" >> "$WORK/n_tls"
  tls_pair "$ALOFT_TLS_IP:$ALOFT_TLS_PORT" >> "$WORK/a_tls"
done
N_TLS="$(median < "$WORK/n_tls")"; A_TLS="$(median < "$WORK/a_tls")"
printf "nginx  %10.0f handshakes/s\naloft  %10.0f handshakes/s\n" "$N_TLS" "$A_TLS"

echo "== ratios (Aloft / nginx)"
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
echo "req/s        $(ratio "$A_RPS" "$N_RPS")x   (target >= 1.0)"
echo "CPU/request  $(ratio "$A_CPU" "$N_CPU")x   (proxy CPU per request; < 1.0 = Aloft cheaper; load-independent)"
echo "p99          $(ratio "$A_P99" "$N_P99")x   (target <= 1.0)"
echo "h2 req/s     $(ratio "$A_H2" "$N_H2")x"
echo "handshakes/s $(ratio "$A_TLS" "$N_TLS")x   (target >= 1.0)"
echo "RSS@10k idle $(awk -v r="$RSS_IDLE" 'BEGIN { printf "%.1f MiB", r/1024 }')   (target < 64 MiB; $(awk -v r="$RSS_KA" 'BEGIN { printf "%.1f MiB", r/1024 }') after one request each)"
