#!/usr/bin/env bash
# Builds crates/cli/tests/flygo (a small client of Aloft written with fly-go, the version
# flyctl v0.4.83 pins, as a library) from the Go module proxy, once per version of its
# sources, into a cache outside the repo, and exports ALOFT_TEST_FLYGO (its path) for
# crates/cli/tests/flyctl.rs. Sourced by scripts/test.sh; returns 1 when Go is missing or
# the build fails, since the fly-go scenario must run.
flygo_src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/crates/cli/tests/flygo"
flygo_hash=$(cat "$flygo_src/main.go" "$flygo_src/go.mod" "$flygo_src/go.sum" | sha256sum | cut -c1-16)
flygo_cache=/var/cache/aloft-test/flygo-$flygo_hash
flygo_bin=$flygo_cache/flygo-client
if [[ ! -x "$flygo_bin" ]]; then
  if ! command -v go >/dev/null 2>&1 && [[ -x /usr/local/go/bin/go ]]; then
    export PATH="/usr/local/go/bin:$PATH"
  fi
  if ! command -v go >/dev/null 2>&1; then
    echo "flygo-for-tests: no Go toolchain (fly-go v0.9.3 needs Go >= 1.25.8)" >&2
    return 1 2>/dev/null || exit 1
  fi
  echo "flygo-for-tests: building the fly-go client (once)"
  if ! mkdir -p "$flygo_cache" \
    || ! (cd "$flygo_src" && GOFLAGS="-mod=readonly -buildvcs=false" go build -o "$flygo_bin.tmp" .); then
    echo "flygo-for-tests: building the fly-go client failed" >&2
    return 1 2>/dev/null || exit 1
  fi
  mv "$flygo_bin.tmp" "$flygo_bin"
fi
export ALOFT_TEST_FLYGO=$flygo_bin
