#!/usr/bin/env bash
# `make test-arm`: the end-to-end subset on armhf (Cortex-A7, the STM32MP15's CPU) and
# arm64, under qemu-user, against that architecture's own nats-server, SoftHSM and swtpm,
# with the Python packages at the board's versions (requirements-board.txt). Not part of
# `make test`: a fresh armhf setup takes ~30 min, a cached one a few.
#
#   scripts/test-arm.sh [ARCH...]      default: armhf arm64, one after the other
#
# Roots, wheelhouses and the venvs are cached under $EDGEKMS_ARM_CACHE (default
# ~/.cache/edgekms-arm; see scripts/arm-root.sh). The output of each run, and on armhf the
# stack's resident memory, land in $EDGEKMS_ARM_RESULTS (default bench/results/arm/).
# Set EDGEKMS_ARM_TESTS to run other tests than tests/board-subset.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

CACHE=${EDGEKMS_ARM_CACHE:-$HOME/.cache/edgekms-arm}
RESULTS=${EDGEKMS_ARM_RESULTS:-$REPO/bench/results/arm}
export EDGEKMS_ARM_CACHE=$CACHE

# The subset (tests/board-subset.txt): gRPC -> broker -> NATS -> SoftHSM/TPM sign, CA
# issuance, the audit chain.
mapfile -t DEFAULT_TESTS < <(grep -vE '^\s*(#|$)' tests/board-subset.txt)
read -r -a TESTS <<<"${EDGEKMS_ARM_TESTS:-${DEFAULT_TESTS[*]}}"

ROOT_SRC=/opt/edgekms            # the project's tree inside the root (replaced every run)
ROOT_VENV=/opt/edgekms-board     # the board's versions (requirements-board-test.txt)
ROOT_WHEELS=/var/cache/edgekms-wheels
# The tests' deadlines (tests/conftest.py SLOWDOWN): emulation is 10-30x slower.
SLOWDOWN=${EDGEKMS_TEST_SLOWDOWN:-20}
# See setup_venv: the armhf run's one departure from requirements-board.txt.
ARMHF_CRYPTOGRAPHY=44.0.3
# Built from source inside the roots (no wheel for armv7/aarch64 on PyPI): the host
# fetches their sdists ...
SDISTS=(python-pkcs11==0.7.0 tpm2-pytss==2.2.1)
# ... and what their builds need (pure Python wheels): python-pkcs11 0.7.0's setup.py
# wants Cython (0.29: the release line it was written for), setuptools_scm, and wheel for
# bdist_wheel; tpm2-pytss 2.2.1's pyproject.toml wants setuptools, wheel,
# setuptools_scm[toml], pycparser and pkgconfig, ...
BUILD_REQS=(setuptools==69.5.1 wheel==0.43.0 Cython==0.29.37 setuptools_scm==8.1.0
  pkgconfig==1.5.5)
# ... and its setup.py imports these (already in the wheelhouse, at the board's pins).
BUILD_IMPORTS="cffi cryptography asn1crypto packaging pycparser typing_extensions"

arm_root() { "$REPO/scripts/arm-root.sh" "$@"; }

log() { echo "test-arm: $*"; }

# The project as the board gets it: a wheel, built once per run on the host (pure Python).
build_project_wheel() {
  local out=$1
  rm -rf "$out"
  mkdir -p "$out"
  "$REPO/.venv/bin/uv" build -q --wheel -o "$out" "$REPO" >/dev/null
}

# The tree the tests run from: the working tree (committed or not), without venvs and caches.
copy_tree() {
  local root=$1
  rm -rf "${root:?}$ROOT_SRC"
  mkdir -p "$root$ROOT_SRC"
  tar -C "$REPO" --exclude=./.git --exclude='./.venv*' --exclude=__pycache__ \
    --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.pytest_cache --exclude=./build \
    --exclude=./bench/results --exclude=./bench/loadgen/build -cf - . |
    tar -C "$root$ROOT_SRC" -xf -
}

# swtpm under qemu-user cannot install its seccomp filter ("seccomp_load failed with errno
# 125"): a wrapper first on PATH turns it off. Only inside the emulated root, never on a board.
swtpm_wrapper() {
  local root=$1
  cat >"$root/usr/local/bin/swtpm" <<'EOF'
#!/bin/sh
# test-arm: qemu-user cannot load swtpm's seccomp filter; the board's kernel can.
exec /usr/bin/swtpm "$@" --seccomp action=none
EOF
  chmod +x "$root/usr/local/bin/swtpm"
}

# What needs no emulated build comes from the host, fast: the binary and pure wheels PyPI
# has for the architecture, and pure-Python sdists (nats-py) built into -none-any wheels.
# Only what compiles (cffi, pyyaml, python-pkcs11, tpm2-pytss) is left to the root, and
# for those the host also fetches the sdists and every build requirement (BUILD_REQS and
# SDISTS): the root then builds offline, without pip's build isolation, whose downloads
# through emulated TLS were reset often enough to lose whole builds.
host_wheels() {
  local arch=$1 wheels=$2 reqs=$3
  local plats=()
  case "$arch" in
    armhf) plats=(linux_armv7l manylinux_2_31_armv7l manylinux_2_28_armv7l manylinux_2_17_armv7l manylinux2014_armv7l) ;;
    arm64) plats=(linux_aarch64 manylinux_2_28_aarch64 manylinux_2_17_aarch64 manylinux2014_aarch64) ;;
  esac
  local platform_args=() p spec tmp
  for p in "${plats[@]}"; do platform_args+=(--platform "$p"); done
  tmp=$(mktemp -d)
  for spec in $(sed 's/#.*//' "$reqs"/requirements-board.txt "$reqs"/requirements-board-test.txt | grep '=='); do
    env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
      "$REPO/.venv/bin/python" -m pip download -q --no-deps --only-binary=:all: --retries 10 \
      "${platform_args[@]}" --python-version 3.11 --implementation cp --abi cp311 --abi abi3 \
      --abi none -d "$wheels" "$spec" >/dev/null 2>&1 && continue
    case "$spec" in
      # Pure Python published as an sdist only: the host makes its -none-any wheel.
      nats-py==*)
        env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
          "$REPO/.venv/bin/python" -m pip wheel -q --no-deps --retries 10 -w "$tmp" "$spec" \
          >/dev/null 2>&1 || true
        ;;
    esac
  done
  cp "$tmp"/*-none-any.whl "$wheels"/ 2>/dev/null || true
  rm -rf "$tmp"
  # The sources of what has no wheel for the architecture, and the (pure Python) wheels
  # their builds import, so the root never needs PyPI.
  local have
  for spec in "${SDISTS[@]}"; do
    have=$(echo "${spec%%==*}-${spec#*==}.tar.gz" | tr 'A-Z_' 'a-z-')
    ls "$wheels" | tr 'A-Z_' 'a-z-' | grep -qx "$have" && continue
    env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
      "$REPO/.venv/bin/python" -m pip download -q --no-deps --no-binary=:all: --retries 10 \
      -d "$wheels" "$spec" >/dev/null || return 1
  done
  env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
    "$REPO/.venv/bin/python" -m pip download -q --no-deps --only-binary=:all: --retries 10 \
    --platform any --implementation py --abi none --python-version 3.11 \
    -d "$wheels" "${BUILD_REQS[@]}" >/dev/null || return 1
}

setup_venv() {
  local arch=$1 root=$2
  local stamp="$root$ROOT_VENV/.board-installed"
  if [ -f "$stamp" ] && cmp -s "$REPO/requirements-board-test.txt" "$stamp.test" &&
    cmp -s "$REPO/requirements-board.txt" "$stamp.board"; then
    return
  fi
  log "$arch: building the wheelhouse and the board venv (long the first time)"
  mkdir -p "$root$ROOT_WHEELS" "$root/var/tmp/edgekms-req"
  cp "$REPO/requirements-board.txt" "$REPO/requirements-board-test.txt" "$root/var/tmp/edgekms-req/"
  if [ "$arch" = armhf ]; then
    # cryptography 42.0.5 has no armv7 wheel on PyPI, and its source build needs crates.io,
    # which this machine cannot reach: armhf takes the oldest release with an armv7 wheel.
    # 42.0.5 itself is proven by `make test-board` (amd64) and on arm64 here.
    sed -i "s/^cryptography==.*/cryptography==$ARMHF_CRYPTOGRAPHY/" \
      "$root/var/tmp/edgekms-req/requirements-board.txt"
  fi
  host_wheels "$arch" "$root$ROOT_WHEELS" "$root/var/tmp/edgekms-req"
  # Offline from here: the build requirements go into the venv first, then each missing
  # wheel (cffi, pyyaml, python-pkcs11, tpm2-pytss: they compile) is built from the
  # wheelhouse's sdist with --no-index --no-build-isolation, one at a time; every wheel
  # built stays in the wheelhouse for the next run.
  local script
  script=$(
    cat <<EOF
set -e
[ -x $ROOT_VENV/bin/pip ] || python3 -m venv $ROOT_VENV
cd /var/tmp/edgekms-req
$ROOT_VENV/bin/pip install -q --no-index --find-links $ROOT_WHEELS ${BUILD_REQS[*]} $BUILD_IMPORTS
for spec in \$(cat requirements-board.txt requirements-board-test.txt | sed 's/#.*//' | grep '=='); do
  name=\${spec%%==*}; version=\${spec#*==}
  file=\$(echo "\$name" | tr 'A-Z.-' 'a-z__')
  if ls $ROOT_WHEELS | tr 'A-Z' 'a-z' | grep -q "^\$file-\$version-.*\\.whl\$"; then continue; fi
  echo "test-arm: building \$spec (offline)"
  $ROOT_VENV/bin/pip wheel -q --no-deps --no-index --no-build-isolation --find-links $ROOT_WHEELS -w $ROOT_WHEELS "\$spec"
done
$ROOT_VENV/bin/pip install -q --no-index --find-links $ROOT_WHEELS -r requirements-board-test.txt
EOF
  )
  arm_root run "$arch" /bin/sh -c "$script" || return 1
  cp "$REPO/requirements-board-test.txt" "$stamp.test"
  cp "$REPO/requirements-board.txt" "$stamp.board"
  touch "$stamp"
}

run_arch() {
  local arch=$1
  local root="$CACHE/$arch/root"
  local t0=$SECONDS
  log "$arch: root"
  arm_root build "$arch" || return 1
  setup_venv "$arch" "$root" || return 1
  log "$arch: installing the project"
  build_project_wheel "$CACHE/$arch/project-wheel" || return 1
  rm -rf "$root/var/tmp/edgekms-project-wheel" && cp -r "$CACHE/$arch/project-wheel" "$root/var/tmp/edgekms-project-wheel"
  copy_tree "$root"
  swtpm_wrapper "$root"
  arm_root run "$arch" /bin/sh -c \
    "$ROOT_VENV/bin/pip install -q --no-deps --force-reinstall /var/tmp/edgekms-project-wheel/*.whl" ||
    return 1
  mkdir -p "$RESULTS"
  local out="$RESULTS/test-$arch.txt"
  log "$arch: the end-to-end subset (output: $out)"
  local rc=0
  {
    echo "# make test-arm, $arch, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "# root: Debian bookworm $arch under qemu-user $(dpkg-query -W -f='${Version}' qemu-user-static)${QEMU_NOTE[$arch]:-}"
    arm_root run "$arch" /bin/sh -c "
      echo \"# uname -m (emulated): \$(uname -m); nats-server \$(nats-server --version); \$(softhsm2-util --version | sed 's/^/softhsm /'); \$(/usr/bin/swtpm --version | head -1)\"
      echo \"# python: \$($ROOT_VENV/bin/python -c 'import platform; print(platform.python_version(), platform.machine())')\"
      echo \"# packages: \$($ROOT_VENV/bin/pip list --format=freeze 2>/dev/null | grep -iE '^(grpcio|protobuf|cryptography|python-pkcs11|tpm2-pytss|nats-py|cffi|uvloop)==' | tr '\n' ' ')\"
    "
  } >"$out"
  # /tmp is a tmpfs inside the root (scripts/arm-root.sh): SoftHSM's token directories
  # under pytest's tmp_path must not be on the host's ext4 on armhf (see docs/arm.md).
  arm_root run "$arch" /bin/sh -c "cd $ROOT_SRC && EDGEKMS_TEST_SLOWDOWN=$SLOWDOWN $ROOT_VENV/bin/python -m pytest -p no:cacheprovider -ra --timeout=1800 ${TESTS[*]}" \
    >>"$out" 2>&1 || rc=$?
  echo "# exit $rc, $((SECONDS - t0)) s for this architecture (setup included)" >>"$out"
  tail -5 "$out"
  if [ "$arch" = armhf ]; then
    # A measurement of its own (a stack started as a user starts it), whatever the tests said.
    log "$arch: the stack's resident memory (output: $RESULTS/memory-armhf.json)"
    if arm_root run "$arch" /bin/sh -c \
      "cd $ROOT_SRC && $ROOT_VENV/bin/python -m bench.stackmem --load-seconds 0 --label 'armhf under qemu-user (cortex-a7), board versions' --out /var/tmp/edgekms-memory-armhf.json" \
      >"$RESULTS/memory-armhf.md" 2>&1; then
      cp "$root/var/tmp/edgekms-memory-armhf.json" "$RESULTS/memory-armhf.json"
    else
      rc=1
    fi
    cat "$RESULTS/memory-armhf.md"
  fi
  return $rc
}

declare -A QEMU_NOTE=([armhf]=", QEMU_CPU=cortex-a7")
ARCHES=("$@")
[ ${#ARCHES[@]} -gt 0 ] || ARCHES=(armhf arm64)
failed=()
for arch in "${ARCHES[@]}"; do
  run_arch "$arch" || failed+=("$arch")
done
if [ ${#failed[@]} -gt 0 ]; then
  log "FAILED on ${failed[*]}"
  exit 1
fi
log "passed on ${ARCHES[*]}"
