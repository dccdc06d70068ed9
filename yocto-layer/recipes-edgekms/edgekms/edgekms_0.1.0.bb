SUMMARY = "EdgeKMS: key management for edge devices, keys in OP-TEE or a TPM"
DESCRIPTION = "The EdgeKMS services: a gRPC broker with mutual TLS, one crypto \
               service per token (OP-TEE's PKCS#11 TA, an SPI TPM 2.0), a \
               mini certificate authority and the kmsctl administration CLI, \
               split into one package per service with its systemd unit."
HOMEPAGE = "https://github.com/edgekms/edgekms"
BUGTRACKER = "https://github.com/edgekms/edgekms/issues"
SECTION = "console/network"
LICENSE = "Apache-2.0"
# The repository carries the Apache-2.0 text in LICENSE.
LIC_FILES_CHKSUM = "file://LICENSE;md5=3b83ef96387f14655fc854ddc3c6bd57"

# The wire contract is regenerated with scarthgap's protoc (grpcio-tools 1.62):
# the committed modules come from a newer protoc whose runtime check refuses
# the python3-protobuf 4.25 of meta-python.
DEPENDS += "python3-grpcio-tools-native"

PV .= "+git"

# The project at a fixed commit: archivable (archiver, SPDX), reproducible, and never a
# stale working tree. Bump SRCREV to release; for development, point devtool or
# EXTERNALSRC:pn-edgekms in local.conf at a checkout instead.
SRC_URI = "git://github.com/edgekms/edgekms.git;protocol=https;branch=main \
           file://edgekms-setup.service \
           file://edgekms-nats.service \
           file://edgekms-crypto-hsm0.service \
           file://edgekms-crypto-tpm0.service \
           file://edgekms-ca.service \
           file://edgekms-broker.service \
           file://edgekms-node.service \
           file://edgekms-fleet-hub.service \
           file://edgekms-fleet-device.service \
           file://edgekms-agent.service \
           file://edgekms-agent.toml \
           file://edgekms-spiffe-agent.service \
           file://edgekms-init.service \
           file://edgekms-datafs.service \
           file://edgekms-provision.service \
           file://edgekms-datafs \
           file://edgekms-provision \
           file://edgekms-unlock@.service \
           file://edgekms-unlock-keyscript \
           file://tee-supplicant-edgekms.conf \
           file://edgekms.tmpfiles \
           file://edgekms-tee.rules"
SRCREV = "f2ca3f7a15238773fee3fe89f60b3509970b65a6"

S = "${WORKDIR}/git"

inherit python_setuptools_build_meta systemd useradd

EDGEKMS_SERVICES = "setup nats crypto-hsm0 crypto-tpm0 ca broker init datafs provision agent spiffe-agent \
                    node fleet-hub fleet-device"

do_install:append() {
    site=${D}${PYTHON_SITEPACKAGES_DIR}
    for proto in ${S}/protos/edgekms/v1/*.proto; do
        rel=edgekms/v1/$(basename ${proto})
        grpc_out=""
        if grep -q '^service ' ${proto}; then
            grpc_out="--grpc_python_out=${site}"
        fi
        nativepython3 -m grpc_tools.protoc -I${S}/protos --python_out=${site} ${grpc_out} ${rel}
    done

    install -d ${D}${systemd_system_unitdir}
    for svc in ${EDGEKMS_SERVICES}; do
        install -m 0644 ${WORKDIR}/edgekms-${svc}.service ${D}${systemd_system_unitdir}/
    done
    sed -i -e 's,@BINDIR@,${bindir},g' \
           -e 's,@SYSCONFDIR@,${sysconfdir},g' \
           -e 's,@LOCALSTATEDIR@,${localstatedir},g' \
           -e 's,@LIBEXECDIR@,${libexecdir},g' \
           -e 's,@LIBDIR@,${libdir},g' \
           ${D}${systemd_system_unitdir}/edgekms-*.service

    # tee-supplicant (meta-arm) as its own user, its state on the data partition.
    install -d ${D}${systemd_system_unitdir}/tee-supplicant@.service.d
    sed -e 's,@LOCALSTATEDIR@,${localstatedir},g' ${WORKDIR}/tee-supplicant-edgekms.conf \
        > ${D}${systemd_system_unitdir}/tee-supplicant@.service.d/edgekms.conf

    # First boot and every boot after: the bus identities (mgmt.natsauth), as `kmsctl up` makes them.
    install -d ${D}${libexecdir}/edgekms
    install -m 0755 ${S}/deploy/edgekms-setup ${D}${libexecdir}/edgekms/edgekms-setup
    # The encrypted data partition and the first-boot console ceremony.
    # Remote unlock: a template unit per volume, and a crypttab keyscript.
    sed -e 's,@BINDIR@,${bindir},g' -e 's,@SYSCONFDIR@,${sysconfdir},g' \
        ${WORKDIR}/edgekms-unlock@.service > ${D}${systemd_system_unitdir}/edgekms-unlock@.service
    for script in edgekms-datafs edgekms-provision edgekms-unlock-keyscript; do
        sed -e 's,@LIBEXECDIR@,${libexecdir},g' \
            -e 's,@BINDIR@,${bindir},g' \
            -e 's,@SYSCONFDIR@,${sysconfdir},g' \
            -e 's,@LOCALSTATEDIR@,${localstatedir},g' \
            -e 's,@LIBDIR@,${libdir},g' \
            ${WORKDIR}/${script} > ${D}${libexecdir}/edgekms/${script}
        chmod 0755 ${D}${libexecdir}/edgekms/${script}
    done

    install -d ${D}${nonarch_libdir}/tmpfiles.d
    sed -e 's,@LOCALSTATEDIR@,${localstatedir},g' ${WORKDIR}/edgekms.tmpfiles \
        > ${D}${nonarch_libdir}/tmpfiles.d/edgekms.conf

    install -d ${D}${nonarch_base_libdir}/udev/rules.d
    install -m 0644 ${WORKDIR}/edgekms-tee.rules ${D}${nonarch_base_libdir}/udev/rules.d/60-edgekms-tee.rules

    install -d ${D}${sysconfdir}/edgekms
    for conf in crypto-hsm0.toml crypto-tpm0.toml broker.toml ca.toml; do
        install -m 0644 ${S}/deploy/${conf} ${D}${sysconfdir}/edgekms/${conf}
    done
    # The device agent's list of what to keep fresh (kmsctl agent, docs/agent.md).
    install -m 0644 ${WORKDIR}/edgekms-agent.toml ${D}${sysconfdir}/edgekms/agent.toml
}

PACKAGE_BEFORE_PN = "${PN}-datafs ${PN}-provision ${PN}-setup ${PN}-nats ${PN}-crypto-hsm ${PN}-crypto-tpm ${PN}-ca ${PN}-broker ${PN}-init ${PN}-agent ${PN}-spiffe-agent ${PN}-unlock ${PN}-node"

FILES:${PN} += "${nonarch_libdir}/tmpfiles.d/edgekms.conf"
FILES:${PN}-datafs += "${systemd_system_unitdir}/edgekms-datafs.service \
                       ${libexecdir}/edgekms/edgekms-datafs"
FILES:${PN}-provision += "${systemd_system_unitdir}/edgekms-provision.service \
                          ${libexecdir}/edgekms/edgekms-provision"
FILES:${PN}-setup += "${systemd_system_unitdir}/edgekms-setup.service \
                      ${libexecdir}/edgekms/edgekms-setup"
FILES:${PN}-nats += "${systemd_system_unitdir}/edgekms-nats.service"
FILES:${PN}-crypto-hsm += "${systemd_system_unitdir}/edgekms-crypto-hsm0.service \
                           ${systemd_system_unitdir}/tee-supplicant@.service.d/edgekms.conf \
                           ${sysconfdir}/edgekms/crypto-hsm0.toml \
                           ${nonarch_base_libdir}/udev/rules.d/60-edgekms-tee.rules"
FILES:${PN}-crypto-tpm += "${systemd_system_unitdir}/edgekms-crypto-tpm0.service \
                           ${sysconfdir}/edgekms/crypto-tpm0.toml"
FILES:${PN}-ca += "${systemd_system_unitdir}/edgekms-ca.service \
                   ${sysconfdir}/edgekms/ca.toml"
FILES:${PN}-broker += "${systemd_system_unitdir}/edgekms-broker.service \
                       ${sysconfdir}/edgekms/broker.toml"
FILES:${PN}-init += "${systemd_system_unitdir}/edgekms-init.service"
FILES:${PN}-agent += "${systemd_system_unitdir}/edgekms-agent.service \
                      ${sysconfdir}/edgekms/agent.toml"
FILES:${PN}-spiffe-agent += "${systemd_system_unitdir}/edgekms-spiffe-agent.service"
FILES:${PN}-unlock += "${systemd_system_unitdir}/edgekms-unlock@.service \
                       ${libexecdir}/edgekms/edgekms-unlock-keyscript"
# The single-process modes (kmsctl up) on the board's OP-TEE token: a cluster node, a
# fleet hub, a fleet device; each replaces the per-service units (docs/cluster.md).
FILES:${PN}-node += "${systemd_system_unitdir}/edgekms-node.service \
                     ${systemd_system_unitdir}/edgekms-fleet-hub.service \
                     ${systemd_system_unitdir}/edgekms-fleet-device.service"

CONFFILES:${PN}-crypto-hsm = "${sysconfdir}/edgekms/crypto-hsm0.toml"
CONFFILES:${PN}-crypto-tpm = "${sysconfdir}/edgekms/crypto-tpm0.toml"
CONFFILES:${PN}-ca = "${sysconfdir}/edgekms/ca.toml"
CONFFILES:${PN}-broker = "${sysconfdir}/edgekms/broker.toml"
CONFFILES:${PN}-agent = "${sysconfdir}/edgekms/agent.toml"

SYSTEMD_PACKAGES = "${PN}-datafs ${PN}-provision ${PN}-setup ${PN}-nats ${PN}-crypto-hsm ${PN}-crypto-tpm ${PN}-ca ${PN}-broker ${PN}-init ${PN}-agent ${PN}-spiffe-agent ${PN}-unlock ${PN}-node"
SYSTEMD_SERVICE:${PN}-datafs = "edgekms-datafs.service"
SYSTEMD_SERVICE:${PN}-provision = "edgekms-provision.service"
SYSTEMD_SERVICE:${PN}-setup = "edgekms-setup.service"
SYSTEMD_SERVICE:${PN}-nats = "edgekms-nats.service"
SYSTEMD_SERVICE:${PN}-crypto-hsm = "edgekms-crypto-hsm0.service"
SYSTEMD_SERVICE:${PN}-crypto-tpm = "edgekms-crypto-tpm0.service"
SYSTEMD_SERVICE:${PN}-ca = "edgekms-ca.service"
SYSTEMD_SERVICE:${PN}-broker = "edgekms-broker.service"
SYSTEMD_SERVICE:${PN}-init = "edgekms-init.service"
SYSTEMD_SERVICE:${PN}-agent = "edgekms-agent.service"
# The Workload API (kmsctl spiffe agent, docs/spiffe.md) on /run/edgekms/workload.sock.
SYSTEMD_SERVICE:${PN}-spiffe-agent = "edgekms-spiffe-agent.service"
# A template: enabled per volume (systemctl enable edgekms-unlock@data.service).
SYSTEMD_SERVICE:${PN}-unlock = "edgekms-unlock@.service"
SYSTEMD_AUTO_ENABLE:${PN}-unlock = "disable"
# Shipped, never enabled by default: a board runs the per-service units until its
# operator switches it over to one of these.
SYSTEMD_SERVICE:${PN}-node = "edgekms-node.service edgekms-fleet-hub.service edgekms-fleet-device.service"
SYSTEMD_AUTO_ENABLE:${PN}-node = "disable"

# One system user per service; tss (from tpm2-tss) and teeclnt give device access;
# teesuppl runs tee-supplicant (see tee-supplicant-edgekms.conf).
USERADD_PACKAGES = "${PN}-nats ${PN}-crypto-hsm ${PN}-crypto-tpm ${PN}-ca ${PN}-broker ${PN}-init ${PN}-node"
USERADD_PARAM:${PN}-nats = "--system --no-create-home --home-dir /nonexistent --shell /sbin/nologin --user-group edgekms-nats"
GROUPADD_PARAM:${PN}-crypto-hsm = "--system teeclnt"
USERADD_PARAM:${PN}-crypto-hsm = "--system --no-create-home --home-dir /nonexistent --shell /sbin/nologin --user-group --groups teeclnt edgekms-hsm; \
                                  --system --no-create-home --home-dir /nonexistent --shell /sbin/nologin --user-group teesuppl"
GROUPADD_PARAM:${PN}-crypto-tpm = "--system tss"
USERADD_PARAM:${PN}-crypto-tpm = "--system --no-create-home --home-dir /nonexistent --shell /sbin/nologin --user-group --groups tss edgekms-tpm"
USERADD_PARAM:${PN}-ca = "--system --no-create-home --home-dir /nonexistent --shell /sbin/nologin --user-group edgekms-ca"
USERADD_PARAM:${PN}-init = "--system --no-create-home --home-dir /nonexistent --shell /sbin/nologin --user-group edgekms-init"
USERADD_PARAM:${PN}-broker = "--system --no-create-home --home-dir /nonexistent --shell /sbin/nologin --user-group edgekms-broker"
# kmsctl up and its whole stack in one unit: one user, in teeclnt for /dev/tee0.
GROUPADD_PARAM:${PN}-node = "--system teeclnt"
USERADD_PARAM:${PN}-node = "--system --no-create-home --home-dir /nonexistent --shell /sbin/nologin --user-group --groups teeclnt edgekms-node"

RDEPENDS:${PN} += "python3-asn1crypto \
                   python3-click \
                   python3-cryptography \
                   python3-grpcio \
                   python3-grpcio-health-checking \
                   python3-grpcio-reflection \
                   python3-logging \
                   python3-nats-py \
                   python3-protobuf \
                   python3-tomllib"
RDEPENDS:${PN}-setup += "${PN} python3-crypt"
RDEPENDS:${PN}-nats += "${PN}-setup nats-server"
RDEPENDS:${PN}-crypto-hsm += "${PN} \
                              optee-client \
                              python3-pkcs11"
# tpm2-pytss >= 2.2.1 (our recipe: 2.1.0 does not import with cryptography 42); the
# device TCTI is a plugin tpm2-tss loads at run time for device:/dev/tpmrm0.
RDEPENDS:${PN}-crypto-tpm += "${PN} \
                              libtss2-tcti-device \
                              python3-tpm2-pytss (>= 2.2.1) \
                              tpm2-tss"
RDEPENDS:${PN}-datafs += "cryptsetup \
                          e2fsprogs-mke2fs \
                          systemd-crypt \
                          util-linux-mount \
                          util-linux-mountpoint \
                          util-linux-umount"
RDEPENDS:${PN}-provision += "${PN}-datafs \
                             ${PN}-init \
                             opensc \
                             util-linux-mount \
                             util-linux-umount"
RDEPENDS:${PN}-ca += "${PN}"
RDEPENDS:${PN}-broker += "${PN}"
RDEPENDS:${PN}-init += "${PN}"
RDEPENDS:${PN}-agent += "${PN}"
RDEPENDS:${PN}-spiffe-agent += "${PN}"
RDEPENDS:${PN}-node += "${PN} \
                        ${PN}-datafs \
                        ${PN}-provision \
                        nats-server \
                        optee-client \
                        python3-pkcs11"
RDEPENDS:${PN}-unlock += "${PN} \
                          cryptsetup \
                          libtss2-tcti-device \
                          python3-tpm2-pytss (>= 2.2.1) \
                          tpm2-tss"

CVE_PRODUCT = "edgekms"
