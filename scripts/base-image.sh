#!/usr/bin/env bash
# Make sure the base image the Dockerfiles start FROM exists in the local engine.
#
# Where a registry is reachable the engine pulls debian:bookworm-slim as usual and this
# script does nothing. Where none is (these machines: no registry but Debian's archive),
# it builds the same Debian 12 userland with debootstrap from the archive the host's apt
# already uses and imports it under that name, so the Dockerfiles build unchanged.
# Idempotent: an image that is already there is left alone (the engine's storage is the
# cache between runs). Needs root for debootstrap.
#
#   scripts/base-image.sh [ENGINE]     ENGINE: podman (default if present) or docker
set -euo pipefail

IMAGE=${EDGEKMS_BASE_IMAGE:-docker.io/library/debian:bookworm-slim}
SUITE=bookworm
ENGINE=${1:-${EDGEKMS_ENGINE:-$(command -v podman >/dev/null 2>&1 && echo podman || echo docker)}}

if "$ENGINE" image inspect "$IMAGE" >/dev/null 2>&1; then
  exit 0
fi
# A registry first: the real image is the better base where it can be had.
if timeout 60 "$ENGINE" pull -q "$IMAGE" >/dev/null 2>&1; then
  echo "base-image: pulled $IMAGE"
  exit 0
fi

# The archive the host's apt uses (deb822 sources first, then the one-line format).
mirror=$(
  { grep -hs '^URIs:' /etc/apt/sources.list.d/debian.sources || true
    grep -hs '^deb ' /etc/apt/sources.list || true; } | awk '{print $2}' \
    | grep -v security | head -n1 || true
)
mirror=${mirror:-http://deb.debian.org/debian}
command -v debootstrap >/dev/null 2>&1 || {
  echo "base-image: $IMAGE cannot be pulled and debootstrap is not installed" >&2
  exit 1
}
root=$(mktemp -d "${TMPDIR:-/tmp}/edgekms-base.XXXXXX")
trap 'rm -rf "$root"' EXIT
echo "base-image: no registry; building $IMAGE with debootstrap from $mirror"
debootstrap --variant=minbase "$SUITE" "$root" "$mirror" >"$root.log" 2>&1 || {
  tail -n 20 "$root.log" >&2
  rm -f "$root.log"
  exit 1
}
rm -f "$root.log"
# What the slim image leaves out too: apt lists, caches, logs.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log
tar -C "$root" -c . | "$ENGINE" import --change 'CMD ["bash"]' - "$IMAGE" >/dev/null
echo "base-image: imported $IMAGE"
