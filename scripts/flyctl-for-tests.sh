#!/usr/bin/env bash
# Builds the real flyctl at a pinned release from the Go module proxy, once, into a cache
# outside the repo, and exports ALOFT_TEST_FLYCTL (its path) for crates/cli/tests/flyctl.rs.
# Sourced by scripts/test.sh; returns 1 when Go is missing or the build fails, since the
# flyctl scenario must run.
#
# `go install github.com/superfly/flyctl@VERSION` does not work here: it asks the proxy for
# the module's version list (to check for deprecation) and the proxy answers 403. So the
# module is downloaded by its exact version and built in place. Only some tags are served
# (v0.4.87, v0.4.84-86 answer 403; v0.4.83 is served).
flyctl_version=v0.4.83
flyctl_cache=/var/cache/aloft-test/flyctl-$flyctl_version
flyctl_bin=$flyctl_cache/bin/flyctl
if [[ ! -x "$flyctl_bin" ]]; then
  if ! command -v go >/dev/null 2>&1 && [[ -x /usr/local/go/bin/go ]]; then
    export PATH="/usr/local/go/bin:$PATH"
  fi
  if ! command -v go >/dev/null 2>&1; then
    echo "flyctl-for-tests: no Go toolchain (flyctl $flyctl_version needs Go >= 1.26.3)" >&2
    return 1 2>/dev/null || exit 1
  fi
  echo "flyctl-for-tests: building flyctl $flyctl_version (takes minutes, once)"
  flyctl_src=$(GOFLAGS=-buildvcs=false go mod download -json "github.com/superfly/flyctl@$flyctl_version" \
    | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
  if [[ -z "$flyctl_src" ]] || ! mkdir -p "$flyctl_cache/bin" \
    || ! (cd "$flyctl_src" && GOFLAGS=-buildvcs=false go build -o "$flyctl_bin.tmp" .); then
    echo "flyctl-for-tests: building flyctl $flyctl_version failed" >&2
    return 1 2>/dev/null || exit 1
  fi
  mv "$flyctl_bin.tmp" "$flyctl_bin"
fi
export ALOFT_TEST_FLYCTL=$flyctl_bin
