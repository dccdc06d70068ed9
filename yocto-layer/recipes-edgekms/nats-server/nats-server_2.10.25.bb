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
# klauspost/compress) and MIT (go.uber.org/automaxprocs).
LICENSE = "Apache-2.0 & BSD-3-Clause & MIT"
LIC_FILES_CHKSUM = "file://src/${GO_IMPORT}/LICENSE;md5=86d3f3a95c324c9479bd8986968f4327"

# v2.10.25 is the last 2.10 release whose go.mod accepts Go 1.22 (scarthgap).
SRC_URI = "git://github.com/nats-io/nats-server.git;protocol=https;branch=release/v2.10.25"
SRCREV = "006039e9580ab071d2e2f40d0a1bcc41a1f3d7d5"

S = "${WORKDIR}/git"

inherit go-mod

GO_IMPORT = "github.com/nats-io/nats-server/v2"
GO_INSTALL = "${GO_IMPORT}"
GO_EXTRA_LDFLAGS = "-s -w -X ${GO_IMPORT}/server.gitCommit=${SRCREV}"
# scarthgap has no gomod:// fetcher: the module downloads are checked against
# go.sum (pinned by SRCREV) while do_compile runs.
# nooelint: oelint.task.network
do_compile[network] = "1"

do_install() {
    install -d ${D}${bindir}
    install -m 0755 ${B}/${GO_BUILD_BINDIR}/nats-server ${D}${bindir}/nats-server
}

BBCLASSEXTEND = "native nativesdk"

CVE_PRODUCT = "linuxfoundation:nats-server"
