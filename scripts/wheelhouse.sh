#!/usr/bin/env bash
# Fill build/wheelhouse with the wheels the service image installs, so that the image
# builds without a package index: the runtime packages at the versions of
# requirements.lock (the list is the one docker/Dockerfile names, read from it so that
# there is one list), and EdgeKMS itself.
#
#   build/wheelhouse/deps/      one wheel per pinned runtime package, copied from a cache
#                               outside the checkout (~/.cache/edgekms/wheelhouse/<hash of
#                               the pinned list>), so a fresh clone (CI) builds none and
#                               the image's dependency layer stays cached
#   build/wheelhouse/edgekms/   the edgekms wheel of the working tree (rebuilt every run)
#
# Packages without a wheel for this platform (tpm2-pytss) are built here, against the
# host's Debian 12 libraries, which are the image's too. Uses the project's venv.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=build/wheelhouse
pattern=$(grep -oE "\^\([^)]*\)==" docker/Dockerfile | head -n1)
[ -n "$pattern" ] || { echo "wheelhouse: docker/Dockerfile names no runtime list" >&2; exit 1; }

mkdir -p "$OUT/edgekms"
grep -E "$pattern" requirements.lock >"$OUT/runtime.txt"
key=$(sha256sum "$OUT/runtime.txt" | cut -c1-16)
cache=${EDGEKMS_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgekms/wheelhouse}/$key
if [ ! -f "$cache/.complete" ]; then
  echo "wheelhouse: building the pinned runtime wheels into $cache"
  rm -rf "$cache" && mkdir -p "$cache"
  "$PY" -m pip wheel -q --disable-pip-version-check --no-deps \
    --wheel-dir "$cache" -r "$OUT/runtime.txt" 2>&1 | { grep -v "is ignored: it is neither" || true; } >&2
  touch "$cache/.complete"
fi
if ! diff -rq "$cache" "$OUT/deps" >/dev/null 2>&1; then
  rm -rf "$OUT/deps" && cp -a "$cache" "$OUT/deps"
fi

rm -f "$OUT"/edgekms/*.whl
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
  --wheel-dir "$OUT/edgekms" . >/dev/null
