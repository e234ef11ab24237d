#!/usr/bin/env bash
# Installs what Aloft needs on a Debian 12 machine (idempotent). Run as root.
#   scripts/setup.sh          packages to run the platform
#   scripts/setup.sh --test   also what the test suite and benchmarks use
set -euo pipefail

packages=(buildah runc iproute2 nftables busybox-static ca-certificates curl procps e2fsprogs)
if [[ "${1:-}" == "--test" ]]; then
  packages+=(skopeo crun podman nginx wrk pebble redis-server redis-tools util-linux openssl nghttp2-client dnsutils gcc libc6-dev dnsperf dnsmasq-base postgresql postgresql-client python3-pip wireguard-go wireguard-tools)
  # microVM driver tests (QEMU under TCG here) and bench/vm.
  packages+=(qemu-system-x86 qemu-utils linux-image-cloud-amd64 e2fsprogs lz4 cpio binutils)
fi

if [[ $(id -u) -ne 0 ]]; then
  echo "setup: run as root (it installs Debian packages)" >&2
  exit 1
fi

missing=()
for package in "${packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  # No systemd here: keep package scripts from starting daemons.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# qemu-system-x86 conflicts with a newer qemu-utils (a backport) and removes it: keep
# qemu-img at the version of the installed QEMU.
if dpkg -s qemu-system-x86 >/dev/null 2>&1 && ! command -v qemu-img >/dev/null 2>&1; then
  qemu_version=$(dpkg-query -W -f='${Version}' qemu-system-x86)
  echo "setup: installing qemu-utils=$qemu_version"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends --allow-downgrades "qemu-utils=$qemu_version" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  [[ -x "$HOME/.cargo/bin/cargo" ]] && export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: no Rust toolchain; installing one with rustup"
  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0
  export PATH="$HOME/.cargo/bin:$PATH"
fi

if [[ "${1:-}" == "--test" ]] && ! command -v go >/dev/null 2>&1 && [[ ! -x /usr/local/go/bin/go ]]; then
  # Debian 12's golang (1.19) is too old for flyctl (go.mod says 1.26.3): the machine's own
  # Go toolchain is needed for scripts/flyctl-for-tests.sh.
  echo "setup: WARNING: no Go toolchain (>= 1.26.3); the flyctl scenario test will fail" >&2
fi

if [[ "${1:-}" == "--test" ]]; then
  # Schemathesis fuzzes the API against its OpenAPI document, at a pinned version so a new
  # release cannot change what a green run means.
  schemathesis_version=4.32.5
  if ! schemathesis --version 2>/dev/null | grep -qx "schemathesis, version $schemathesis_version"; then
    echo "setup: installing schemathesis $schemathesis_version (pip)"
    python3 -m pip install -q "schemathesis==$schemathesis_version" >/dev/null 2>&1 \
      || python3 -m pip install -q --break-system-packages "schemathesis==$schemathesis_version" >/dev/null 2>&1 \
      || echo "setup: WARNING: could not install schemathesis $schemathesis_version; the OpenAPI fuzz test will fail" >&2
  fi
fi
