#!/usr/bin/env bash
# check-layer.sh: parse meta-edgekms with bitbake against the upstream layers pinned in
# kas/edgekms-stm32mp15-disco.yml, the way a Yocto maintainer checks a layer.
#
# For each machine it runs, with DISTRO=edgekms-os and no network:
#   bitbake -p                       parse every recipe of every layer
#   bitbake -e <recipe>              the environment of each recipe of this layer
#   bitbake -g edgekms-image         resolve every DEPENDS/RDEPENDS of the image
# and exits 0 only if no ERROR appeared and no WARNING names this layer.
#   stm32mp15-disco  all the kas layers (the board)
#   qemuarm64        the kas layers without meta-st-stm32mp: the layer must stand without
#                    the BSP (its board parts are dynamic-layers/stm-st-stm32mp)
#
# Upstream layers: with network, the script clones each kas repository and checks out
# the pinned commit under $EDGEKMS_LAYERS_DIR (default: $WORKDIR/layers). Without
# network, put checkouts there yourself (one directory per kas repository name: poky,
# meta-openembedded, meta-security, meta-arm, meta-st-stm32mp) and point
# EDGEKMS_LAYERS_DIR at them; a checkout at another commit than the pin is an error
# unless ALLOW_UNPINNED=1 (then it is reported).
#
# Environment:
#   EDGEKMS_LAYERS_DIR  upstream checkouts (default $WORKDIR/layers)
#   WORKDIR             build directories and logs (default /tmp/edgekms-check-layer);
#                       reused between runs, so bitbake's parse cache makes reruns fast
#   MACHINES            default "stm32mp15-disco qemuarm64"
#   ALLOW_UNPINNED=1    accept checkouts that are not at the kas commit
#   BITBAKE_USER        bitbake refuses to run as root: when started as root the script
#                       runs bitbake as this user (default: yocto)
#
# Host needs (Debian 12 names): git python3 python3-yaml gawk diffstat chrpath cpio
# file lz4 zstd wget locales with en_US.UTF-8 generated, and a non-root user. It is not
# part of `make test`: CI has no network for the upstream layers.
#
# Exit status: 0 OK, 1 check failed, 2 setup problem. The last line is
# "check-layer: OK ..." or "check-layer: FAIL ...".
set -u -o pipefail

HERE=$(cd "$(dirname "$0")" && pwd -P)
LAYER_DIR=$(cd "$HERE/.." && pwd -P)
KAS=$LAYER_DIR/kas/edgekms-stm32mp15-disco.yml
WORKDIR=${WORKDIR:-/tmp/edgekms-check-layer}
EDGEKMS_LAYERS_DIR=${EDGEKMS_LAYERS_DIR:-$WORKDIR/layers}
MACHINES=${MACHINES:-"stm32mp15-disco qemuarm64"}
ALLOW_UNPINNED=${ALLOW_UNPINNED:-0}
BITBAKE_USER=${BITBAKE_USER:-yocto}
DISTRO=edgekms-os
IMAGE=edgekms-image

fail() { echo "check-layer: FAIL $*"; exit "${2:-1}"; }
setup_fail() { echo "check-layer: FAIL $*"; exit 2; }

for tool in git python3 gawk diffstat chrpath cpio; do
    command -v "$tool" >/dev/null || setup_fail "host tool '$tool' missing (see the header for the list)"
done
python3 -c 'import yaml' 2>/dev/null || setup_fail "python3-yaml missing"
[ -f "$KAS" ] || setup_fail "$KAS not found"

# --- the pins ------------------------------------------------------------------------
# One line per kas repository with a url: name url commit layer-subdir...
PINS=$(python3 - "$KAS" <<'PY'
import sys, yaml
kas = yaml.safe_load(open(sys.argv[1]))
for name, repo in kas["repos"].items():
    if not repo or "url" not in repo:
        continue
    layers = list((repo.get("layers") or {".": None}).keys())
    print(name, repo["url"], repo["commit"], *layers)
PY
) || setup_fail "cannot read $KAS"
LOCAL_CONF_HEADER=$(python3 - "$KAS" <<'PY'
import sys, yaml
kas = yaml.safe_load(open(sys.argv[1]))
for text in (kas.get("local_conf_header") or {}).values():
    print(text)
PY
)

mkdir -p "$EDGEKMS_LAYERS_DIR" "$WORKDIR" || setup_fail "cannot create $WORKDIR"
echo "== upstream layers (kas pins) in $EDGEKMS_LAYERS_DIR"
while read -r name url commit _; do
    dir=$EDGEKMS_LAYERS_DIR/$name
    if [ ! -d "$dir/.git" ]; then
        echo "   $name: cloning $url"
        git clone -q "$url" "$dir" && git -C "$dir" checkout -q "$commit" \
            || setup_fail "$name: cannot clone $url at $commit (no network? see EDGEKMS_LAYERS_DIR)"
    fi
    head=$(git -C "$dir" rev-parse HEAD 2>/dev/null) || setup_fail "$name: $dir is not a git checkout"
    if [ "$head" = "$commit" ]; then
        echo "   $name: $head (pinned)"
    elif [ "$ALLOW_UNPINNED" = 1 ]; then
        echo "   $name: $head (NOT the pin $commit; ALLOW_UNPINNED=1)"
    else
        fail "$name is at $head, the kas file pins $commit (ALLOW_UNPINNED=1 to go on)"
    fi
done <<<"$PINS"

# --- who runs bitbake ----------------------------------------------------------------
RUN_AS=()
BBHOME=${HOME:-/tmp}
if [ "$(id -u)" = 0 ]; then
    id -u "$BITBAKE_USER" >/dev/null 2>&1 || setup_fail "bitbake refuses root: create user '$BITBAKE_USER' (useradd -m $BITBAKE_USER) or run as a user"
    RUN_AS=(runuser -u "$BITBAKE_USER" --)
    BBHOME=$(getent passwd "$BITBAKE_USER" | cut -d: -f6)
    chown -R "$BITBAKE_USER": "$WORKDIR" 2>/dev/null || true
fi
bb() {  # bb BUILD_DIR COMMAND...: run in the initialised build environment
    local build=$1; shift
    "${RUN_AS[@]}" env -i HOME="$BBHOME" PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        LANG=en_US.UTF-8 LC_ALL=en_US.UTF-8 TERM=dumb \
        bash -c 'cd "$1" && . ./oe-init-build-env "$2" >/dev/null && shift 2 && "$@"' \
        bash "$EDGEKMS_LAYERS_DIR/poky" "$build" "$@"
}

# --- this layer's recipes --------------------------------------------------------------
# PN of every recipe: the main layer always, dynamic-layers/<collection> when present.
layer_recipes() {  # layer_recipes WITH_ST(0|1)
    find "$LAYER_DIR" -name '*.bb' -not -path '*/dynamic-layers/*' -printf '%f\n'
    if [ "$1" = 1 ]; then
        find "$LAYER_DIR/dynamic-layers/stm-st-stm32mp" -name '*.bb' -printf '%f\n'
    fi
}

FAILED=()
for machine in $MACHINES; do
    build=$WORKDIR/build-$machine
    log=$WORKDIR/$machine.log
    with_st=1
    [ "$machine" = qemuarm64 ] && with_st=0
    mkdir -p "$build/conf"
    {
        echo '# generated by check-layer.sh'
        echo 'POKY_BBLAYERS_CONF_VERSION = "2"'
        echo 'BBPATH = "${TOPDIR}"'
        echo 'BBFILES ?= ""'
        echo 'BBLAYERS = " \'
        while read -r name _ _ layers; do
            [ "$name" = meta-st-stm32mp ] && [ "$with_st" = 0 ] && continue
            for sub in $layers; do echo "  $EDGEKMS_LAYERS_DIR/$name/$sub \\" | sed 's,/\. \\$, \\,'; done
        done <<<"$PINS"
        echo "  $LAYER_DIR \\"
        echo '  "'
    } > "$build/conf/bblayers.conf"
    {
        echo '# generated by check-layer.sh'
        echo "$LOCAL_CONF_HEADER"
        echo "MACHINE = \"$machine\""
        echo "DISTRO = \"$DISTRO\""
        echo 'BB_NO_NETWORK = "1"'
        echo 'BB_SRCREV_POLICY = "cache"'
        echo 'CONNECTIVITY_CHECK_URIS = ""'
        echo "DL_DIR = \"$WORKDIR/downloads\""
        echo "SSTATE_DIR = \"$WORKDIR/sstate-cache\""
        echo "TMPDIR = \"$build/tmp\""
    } > "$build/conf/local.conf"
    [ ${#RUN_AS[@]} -gt 0 ] && chown -R "$BITBAKE_USER": "$WORKDIR"

    echo "== $machine: bitbake -p (layers: $(grep -c '^  /' "$build/conf/bblayers.conf"))"
    : > "$log"
    bb "$build" bitbake -p >>"$log" 2>&1
    rc=$?
    grep -E '^(Parsing of|Summary)' "$log" | sed 's/^/   /'
    [ $rc = 0 ] || echo "   bitbake -p exited $rc"
    if [ $rc = 0 ]; then
        for bbfile in $(layer_recipes "$with_st"); do
            pn=${bbfile%%_*}; pn=${pn%.bb}
            echo "== $machine: bitbake -e $pn" | tee -a "$log"
            bb "$build" bitbake -e "$pn" > "$build/env-$pn.txt" 2>>"$log" || { echo "   FAILED" | tee -a "$log"; rc=1; }
            grep -E '^(PV|PREFERRED_PROVIDER_.*|FILE)=' "$build/env-$pn.txt" | grep -E '^(PV|FILE)=' | sed 's/^/   /'
        done
        echo "== $machine: bitbake -g $IMAGE" | tee -a "$log"
        (cd "$build" && bb "$build" bitbake -g "$IMAGE") >>"$log" 2>&1 || rc=1
        if [ -f "$build/pn-buildlist" ]; then
            echo "   $(wc -l < "$build/pn-buildlist") recipes in the image's build list"
        fi
    fi
    errors=$(grep -E '^ERROR:' "$log" | sort -u)
    warnings=$(grep -E '^WARNING:' "$log" | grep -E -e "$LAYER_DIR" -e 'edgekms' | sort -u)
    other=$(grep -E '^WARNING:' "$log" | grep -v -E -e "$LAYER_DIR" -e 'edgekms' | sort -u)
    [ -n "$other" ] && { echo "   upstream warnings (not this layer's):"; echo "$other" | cut -c1-200 | sed 's/^/     /'; }
    [ -n "$warnings" ] && { echo "   WARNINGS naming this layer:"; echo "$warnings" | sed 's/^/     /'; }
    [ -n "$errors" ] && { echo "   ERRORS:"; echo "$errors" | head -40 | sed 's/^/     /'; }
    if [ $rc = 0 ] && [ -z "$errors" ] && [ -z "$warnings" ]; then
        echo "   $machine: OK (log $log)"
    else
        echo "   $machine: FAILED (log $log)"
        FAILED+=("$machine")
    fi
done

[ ${#FAILED[@]} = 0 ] || fail "${FAILED[*]}"
echo "check-layer: OK $MACHINES"
