SUMMARY = "NATS server with JetStream, the state engine and bus of EdgeKMS"
DESCRIPTION = "nats-server is the message broker that carries every EdgeKMS \
               request between the broker, the crypto services and the CA \
               service, and keeps the key registry, CA records and audit \
               log in JetStream. The EdgeKMS units and config come from \
               edgekms-nats; this recipe only builds the binary."
HOMEPAGE = "https://nats.io/"
BUGTRACKER = "https://github.com/nats-io/nats-server/issues"
SECTION = "net"
# The server is Apache-2.0; its Go modules add BSD-3-Clause (golang.org/x,
# klauspost/compress) and MIT (go.uber.org/automaxprocs, klauspost/compress).
LICENSE = "Apache-2.0 & BSD-3-Clause & MIT"
LIC_FILES_CHKSUM = "file://src/${GO_IMPORT}/LICENSE;md5=86d3f3a95c324c9479bd8986968f4327"

# v2.10.25 is the last release whose go.mod accepts the Go 1.22 of scarthgap (2.10.26
# and later need Go 1.23).
SRC_URI = "git://github.com/nats-io/nats-server.git;protocol=https;nobranch=1;name=nats-server \
           file://modules.txt"
SRCREV_nats-server = "006039e9580ab071d2e2f40d0a1bcc41a1f3d7d5"
SRCREV_FORMAT = "nats-server"

# Every Go module of go.mod as its own git SRC_URI at the commit of its tag, checked
# against go.sum, plus vendor/modules.txt: written by scripts/go-mods-inc.py. do_fetch
# gets them all; go-vendor lays them out as vendor/ and the build never goes online.
require ${BPN}-go-mods.inc
require ${BPN}-licenses.inc

S = "${WORKDIR}/git"

inherit go-vendor

GO_IMPORT = "github.com/nats-io/nats-server/v2"
GO_INSTALL = "${GO_IMPORT}"
# No -s -w: the binary is stripped (and its debug info split) by the packaging, as QA
# expects. gitCommit is what `nats-server --version` reports.
GO_EXTRA_LDFLAGS = "-X ${GO_IMPORT}/server.gitCommit=${SRCREV_nats-server}"
# Vendored modules only: a missing one fails the build instead of being downloaded.
export GOFLAGS = "-mod=vendor"
export GOPROXY = "off"

do_install() {
    install -d ${D}${bindir}
    install -m 0755 ${B}/${GO_BUILD_BINDIR}/nats-server ${D}${bindir}/nats-server
}

BBCLASSEXTEND = "native nativesdk"

CVE_PRODUCT = "linuxfoundation:nats-server"
