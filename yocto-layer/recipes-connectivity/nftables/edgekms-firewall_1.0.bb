SUMMARY = "EdgeKMS firewall: nftables rules that open only the broker's port"
DESCRIPTION = "An nftables ruleset loaded before the network comes up: inbound \
               traffic is dropped except established flows, loopback, ICMP \
               and TCP 8443, where the EdgeKMS broker answers with mutual TLS."
HOMEPAGE = "https://github.com/edgekms/edgekms"
BUGTRACKER = "https://github.com/edgekms/edgekms/issues"
SECTION = "net"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://edgekms.nft;beginline=2;endline=2;md5=653b254f286b881bdce1d14afdede628"

SRC_URI = "file://edgekms.nft \
           file://edgekms-firewall.service \
           file://networkd-edgekms-firewall.conf"

S = "${WORKDIR}"

inherit systemd allarch

do_install() {
    install -d ${D}${sysconfdir}/nftables ${D}${systemd_system_unitdir}
    install -m 0600 ${WORKDIR}/edgekms.nft ${D}${sysconfdir}/nftables/edgekms.nft
    install -m 0644 ${WORKDIR}/edgekms-firewall.service ${D}${systemd_system_unitdir}/
    sed -i -e 's,@SBINDIR@,${sbindir},g' -e 's,@SYSCONFDIR@,${sysconfdir},g' \
        ${D}${systemd_system_unitdir}/edgekms-firewall.service
    install -d ${D}${systemd_system_unitdir}/systemd-networkd.service.d
    install -m 0644 ${WORKDIR}/networkd-edgekms-firewall.conf \
        ${D}${systemd_system_unitdir}/systemd-networkd.service.d/edgekms-firewall.conf
}

SYSTEMD_SERVICE:${PN} = "edgekms-firewall.service"
FILES:${PN} += "${systemd_system_unitdir}/systemd-networkd.service.d/edgekms-firewall.conf"

RDEPENDS:${PN} += "nftables"
CVE_PRODUCT = "edgekms"
