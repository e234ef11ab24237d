#!/usr/bin/env bash
# A measurement only (no product code uses it): LUKS in userspace for container volumes.
# qemu-storage-daemon opens a LUKS image (AES through its crypto library, which uses the
# CPU's AES instructions, unlike this host kernel's generic-C AES) and exports the
# decrypted disk over FUSE; a loop device on that file carries ext4; guest-io.rs measures
# it next to a directory of the host filesystem, ROUNDS times, interleaved.
#
#   bench/volumes/userspace-luks.sh          # as root; SIZE_MB=512 FSYNCS=2000 ROUNDS=3
#   DIRECT=off bench/volumes/userspace-luks.sh   # qsd through the host page cache
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
B="${BASE:-/var/tmp/aloft-bench-userspace-luks}"
SIZE="${SIZE_MB:-512}"; FSYNCS="${FSYNCS:-2000}"; ROUNDS="${ROUNDS:-3}"
rm -rf "$B"; mkdir -p "$B/direct" "$B/mnt"
cleanup() {
  umount "$B/mnt" 2>/dev/null || true
  [[ -n "${LOOP:-}" ]] && losetup -d "$LOOP" 2>/dev/null || true
  [[ -s "$B/qsd.pid" ]] && kill "$(cat "$B/qsd.pid")" 2>/dev/null || true
  sleep 1; rm -rf "$B"
}
trap cleanup EXIT
rustc -O -C target-feature=+crt-static --edition 2021 -o "$B/guest-io" "$ROOT/bench/volumes/guest-io.rs"
KEY="$(head -c 64 /dev/urandom | od -An -tx1 | tr -d ' \n')"
truncate -s 2G "$B/plain.img"
mkfs.ext4 -q -F -m 0 -E lazy_itable_init=1,lazy_journal_init=1 "$B/plain.img"
qemu-img convert -q --object secret,id=k,file=/dev/fd/3 -f raw -O luks \
  -o key-secret=k,iter-time=100 "$B/plain.img" "$B/vol.luks" 3< <(printf '%s' "$KEY")
rm "$B/plain.img"
touch "$B/export.img"
qemu-storage-daemon --object secret,id=k,file=/dev/fd/3 \
  --blockdev "driver=file,node-name=f,filename=$B/vol.luks,cache.direct=${DIRECT:-on}" \
  --blockdev driver=luks,node-name=v,file=f,key-secret=k \
  --export "type=fuse,id=e,node-name=v,mountpoint=$B/export.img,writable=on" \
  --pidfile "$B/qsd.pid" 3< <(printf '%s' "$KEY") &
for _ in $(seq 100); do [[ -s "$B/qsd.pid" ]] && break; sleep 0.1; done
sleep 0.5
LOOP="$(losetup --find --show "$B/export.img")"
mount "$LOOP" "$B/mnt"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "target: write MB/s, read MB/s, fsync p50 us, fsync p99 us"
for _ in $(seq "$ROUNDS"); do
  echo "host filesystem: $("$B/guest-io" "$B/direct" "$SIZE" "$FSYNCS")"
  echo "qsd LUKS + FUSE + loop: $("$B/guest-io" "$B/mnt" "$SIZE" "$FSYNCS")"
done
