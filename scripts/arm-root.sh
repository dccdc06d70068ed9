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
# What the stack and the wheels that build from source need inside the root. Not
# nats-server: bookworm's is 2.9.10, and the JetStream config (mgmt/natsserver.py) needs
# 2.10 (see NATS_DEB below). adduser is what the nats-server package's postinst runs.
PACKAGES=(python3 python3-venv python3-pip python3-dev build-essential pkg-config
  libffi-dev libssl-dev libtss2-dev softhsm2 swtpm swtpm-tools openssl
  ca-certificates procps adduser)

# nats-server >= 2.10 of the root's architecture: Debian trixie's package, a Go binary
# that links only libc and runs on bookworm's (Depends: libc6 >= 2.34). The host fetches the .deb
# from its own mirror's pool (pool/ is shared by every suite), checks the pinned SHA-256,
# and dpkg installs it in the root, replacing bookworm's 2.9.10 if a cached root has it.
# The board runs the layer's 2.10.25 (yocto-layer/recipes-*/nats-server). When trixie
# moves on and the mirror drops this version, snapshot.debian.org keeps it: pin the new
# version and its hashes here, or fetch this one from there.
NATS_DEB_VERSION=2.10.27-1+b2
declare -A NATS_DEB_SHA256=(
  [armhf]=471e7cebc4d6adf920740160ba3ed0d1adb61b6f3548cce790dbf31a14b7d0ce
  [arm64]=0c9a617510b28c1b4fb4a38aabea6ab8cd7f026247f2abdff8b955b2278ce049
)

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
  # 8 GiB is a ceiling, not memory taken: each test's nats-server offers JetStream 75% of
  # the free space, and the audit stream reserves 4 GiB (edgekms.audit DEFAULT_MAX_BYTES);
  # with 2 GiB every stack was refused ("insufficient storage resources available").
  mountpoint -q "$root/tmp" || mount -t tmpfs -o size=8g,mode=1777 tmpfs "$root/tmp"
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

# Fetch (once, into the cache) and check the pinned nats-server .deb for ARCH; print its path.
nats_deb() {
  local arch=$1
  local name="nats-server_${NATS_DEB_VERSION}_${arch}.deb"
  local file="$CACHE/debs/$name" want=${NATS_DEB_SHA256[$1]}
  mkdir -p "$CACHE/debs"
  if [ ! -f "$file" ] || ! echo "$want  $file" | sha256sum --quiet -c - >/dev/null 2>&1; then
    # The version's '+' must be %2B in a URL.
    local url
    url="$(mirror)/pool/main/n/nats-server/${name//+/%2B}"
    curl -fsS --retry 5 -o "$file.part" "$url" >&2 || die "could not fetch $url"
    echo "$want  $file.part" | sha256sum --quiet -c - >/dev/null 2>&1 || {
      rm -f "$file.part"
      die "$url does not have the pinned SHA-256 $want"
    }
    mv "$file.part" "$file"
  fi
  echo "$file"
}

# Make the root's nats-server the pinned one (idempotent: a cached root that already has it
# is left alone). The root must be mounted.
install_nats() {
  local arch=$1 root deb have
  root=$(root_of "$arch")
  # shellcheck disable=SC2016
  have=$(in_root "$arch" dpkg-query -W -f='${Version}' nats-server 2>/dev/null || true)
  [ "$have" = "$NATS_DEB_VERSION" ] && return
  deb=$(nats_deb "$arch")
  echo "arm-root: nats-server ${have:-none} -> $NATS_DEB_VERSION in the $arch root"
  mkdir -p "$root/var/cache/edgekms-debs"
  cp -f "$deb" "$root/var/cache/edgekms-debs/"
  in_root "$arch" dpkg -i "/var/cache/edgekms-debs/$(basename "$deb")" \
    >>"$CACHE/$arch/apt.log" 2>&1 || {
    tail -20 "$CACHE/$arch/apt.log" >&2
    die "dpkg -i nats-server failed in the $arch root (log: $CACHE/$arch/apt.log)"
  }
  in_root "$arch" nats-server --version >/dev/null || die "nats-server does not run in the $arch root"
}

build() {
  local arch=$1 root
  root=$(root_of "$arch")
  host_tools
  if [ -f "$CACHE/$arch/root.ok" ]; then
    # Roots cached before the pinned nats-server existed get it now.
    mount_root "$root"
    trap 'umount_root "'"$root"'"' EXIT
    install_nats "$arch"
    umount_root "$root"
    trap - EXIT
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
  install_nats "$arch"
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
