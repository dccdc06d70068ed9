#!/usr/bin/env bash
# Install what EdgeKMS needs on a Debian 12 machine (run as root): the system packages
# that are missing, then the virtual environment from requirements.lock.
# Idempotent: a second run installs nothing and takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
# What the services and tests use: SoftHSM, swtpm and its tools, tpm2-tools, tpm2-openssl
# (the OpenSSL provider through which a device whose key is in its TPM does TLS; the tests
# put swtpm behind tpm2-abrmd on a private dbus-daemon, as /dev/tpmrm0 is), libp11's
# engine libengine-pkcs11-openssl (the same for a key in a PKCS#11 token), libtss2
# (tpm2-pytss builds against it), opensc (pkcs11-tool), openssl and curl (tests check
# signatures and TLS with them), openvpn and gnutls-bin (the CA's .ovpn profiles and
# name-constrained chains are checked by a real OpenVPN and GnuTLS's certtool), golang-go
# (the same chains are checked by Go's crypto/x509 in tests/ca/goverify), and a compiler
# with Python headers for the wheels that build from source; certbot, lego, caddy and
# nginx-light (the ACME tests: real clients obtain certificates, nginx and Caddy serve them),
# and cryptsetup-bin (remote unlock opens a real LUKS2 volume in an image file).
APT_PACKAGES=(softhsm2 swtpm swtpm-tools tpm2-tools tpm2-openssl tpm2-abrmd
  libtss2-tcti-tabrmd0 dbus-daemon libengine-pkcs11-openssl libtss2-dev opensc openssl curl
  openvpn gnutls-bin golang-go ca-certificates gcc make pkg-config certbot lego caddy
  nginx-light cryptsetup-bin)
# The compose stack's end-to-end tests (tests/deploy/test_compose_e2e.py) where no Docker
# engine runs: rootful podman with runc, netavark and aardvark-dns (networks with name
# resolution; iptables for published ports), Debian's docker-compose 1.29 through podman's
# Docker API, and debootstrap for the base image where no registry can be reached
# (scripts/base-image.sh). Installed packages only: the tests' podman settings live in a
# temporary containers.conf of their own (docs/containers.md).
APT_PACKAGES+=(podman runc netavark aardvark-dns iptables docker-compose debootstrap)
# The metrics tests (tests/metrics): a real Prometheus scrapes every service of a stack,
# and promtool checks the example alert rules (deploy/prometheus/).
APT_PACKAGES+=(prometheus)
# The partition tests (tests/cluster/test_partition.py): nats-server nodes in network
# namespaces joined by veth pairs and a bridge (`ip netns`, `ip link`).
APT_PACKAGES+=(iproute2)
# The completion tests (tests/e2e/test_completion.py): `kmsctl completion zsh|fish` loaded
# into the real shells, whose TAB is asked for commands, options and key names.
APT_PACKAGES+=(zsh fish)
# `make bench` also measures cfssl, the peer a NAS admin might pick instead, and drives the
# broker from a Go client (bench/loadgen) built in GOPATH mode from Debian's grpc sources.
# bench/peers.py builds step-ca 0.19.0 the same way from Debian's packaged library source
# (its main.go comes from the source package, fetched by apt-get with a private state) and
# runs cfssl serve with its SQLite certdb (built into Debian's cfssl).
[ -n "${WITH_BENCH:-}" ] && APT_PACKAGES+=(golang-cfssl golang-google-grpc-dev golang-go
  golang-github-smallstep-certificates-dev)
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  APT_PACKAGES+=(python3 python3-venv python3-dev)
elif [ "$("$PYTHON" -c 'import sys; print(sys.prefix)')" = /usr ]; then
  APT_PACKAGES+=(python3-venv python3-dev)  # Debian's own python needs these split parts
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: these Debian packages are missing and only root can install them: ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # On a machine that runs systemd, nginx-light, caddy and prometheus each enable and
  # start a system service as they are installed: nginx serving port 80 to the network,
  # Prometheus on 9090, and Caddy failing beside nginx for the same port. They are test
  # tools here (the tests run their own on free ports), so their services are neither
  # started now (a policy-rc.d that refuses, for this install only, unless the machine
  # has one of its own) nor enabled for the next boot.
  TOOL_SERVICES=(nginx caddy prometheus)
  policy=/usr/sbin/policy-rc.d
  own_policy=
  if [ -d /run/systemd/system ] && [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# scripts/bootstrap.sh: no service starts during its apt-get install\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    own_policy=1
    trap 'rm -f "$policy"' EXIT
    # A service the machine had before this install is the machine's, and left alone.
    new_services=()
    for service in "${TOOL_SERVICES[@]}"; do
      systemctl cat "$service.service" >/dev/null 2>&1 || new_services+=("$service")
    done
  fi
  apt-get -o DPkg::Lock::Timeout=900 update -qq
  apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ -n "$own_policy" ]; then
    rm -f "$policy"
    trap - EXIT
    for service in "${new_services[@]}"; do
      if systemctl cat "$service.service" >/dev/null 2>&1; then
        systemctl disable --quiet "$service.service"
        echo "bootstrap: $service.service came with a test tool: left stopped and disabled"
      fi
    done
  fi
fi

stamp="$VENV/.edgekms-installed"
if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ requirements.lock -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing Python packages from requirements.lock"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "uv==0.13.9"
  "$VENV/bin/uv" pip sync -q --python "$VENV/bin/python" requirements.lock
  "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --no-deps -e .
  touch "$stamp"
fi
# Bytecode for every installed module, as pip writes at install time but uv does not, and
# for our own packages (an editable install, so Python would write it on first import,
# unless PYTHONDONTWRITEBYTECODE is set, as on CI): without it each `kmsctl` run compiles
# click, grpc and protobuf from source again, about 40 % of a `kmsctl key list`
# (docs/performance.md, "kmsctl start-up"). compileall rewrites only what is stale.
compiled="$VENV/.edgekms-bytecode"
if [ ! -f "$compiled" ] || [ "$stamp" -nt "$compiled" ]; then
  # (Not fatal: a wheel may ship files for another Python version that do not compile.)
  "$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" >/dev/null || true
  touch "$compiled"
fi
"$VENV/bin/python" -m compileall -q -j 0 broker crypto_service ca_service mgmt agent spiffe_agent protos/edgekms >/dev/null
