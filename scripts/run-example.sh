#!/usr/bin/env bash
# Sets up and runs a single-host Aloft platform serving examples/hello, until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

cargo build --release -p aloft -p hello
bin=target/x86_64-unknown-linux-gnu/release
cp "$bin/hello" examples/hello/hello

data_dir=${ALOFT_DATA_DIR:-/var/lib/aloft}
"$bin/aloft" server --data-dir "$data_dir" &
server=$!
trap 'kill -INT $server 2>/dev/null; wait $server 2>/dev/null' EXIT INT TERM

for _ in $(seq 1 100); do
  "$bin/aloft" apps list >/dev/null 2>&1 && break
  kill -0 $server 2>/dev/null || { echo "aloft server exited" >&2; exit 1; }
  sleep 0.1
done

"$bin/aloft" apps list | grep -q '^hello ' || "$bin/aloft" apps create hello
(cd examples/hello && "../../$bin/aloft" deploy)

echo
echo "hello is served at http://hello.localhost:8080/"
echo "try:  curl -H 'Host: hello.localhost' http://127.0.0.1:8080/"
echo "(Ctrl-C stops the platform)"
wait $server
