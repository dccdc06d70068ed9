SUMMARY = "EdgeKMS image: the key server and nothing else"
DESCRIPTION = "A hardened image with a read-only root running the EdgeKMS services: \
               keys in OP-TEE's PKCS#11 TA and a TPM 2.0, state on a LUKS2 data \
               partition sealed to the TPM, no login for anyone, provisioning on the \
               serial console at first boot, a firewall open only on the broker's port."
HOMEPAGE = "https://github.com/edgekms/edgekms"
BUGTRACKER = "https://github.com/edgekms/edgekms/issues"
SECTION = "images"
LICENSE = "MIT"

inherit core-image

IMAGE_FEATURES += "read-only-rootfs"
IMAGE_FEATURES:remove = "debug-tweaks tools-debug tools-profile dbg-pkgs dev-pkgs ssh-server-dropbear ssh-server-openssh"
IMAGE_LINGUAS = ""

# Set outright: core-image's default adds packagegroup-base-extended (wifi, zeroconf,
# NFS, avahi, wpa-supplicant...), none of which a key server uses.
IMAGE_INSTALL = "packagegroup-core-boot \
                 edgekms \
                 edgekms-agent \
                 edgekms-spiffe-agent \
                 edgekms-broker \
                 edgekms-ca \
                 edgekms-crypto-hsm \
                 edgekms-crypto-tpm \
                 edgekms-unlock \
                 edgekms-datafs \
                 edgekms-firewall \
                 edgekms-init \
                 edgekms-nats \
                 edgekms-node \
                 edgekms-provision \
                 edgekms-setup \
                 opensc \
                 optee-client \
                 tpm2-tools \
                 tpm2-tss \
                 ${CORE_IMAGE_EXTRA_INSTALL}"

ROOTFS_POSTPROCESS_COMMAND += "edgekms_lock_root;"

# The board's role. The root file system is read-only, so it is chosen here, at build
# time (docs/cluster.md, "Under systemd"): "" runs the per-service units; "node",
# "fleet-hub" or "fleet-device" runs that one `kmsctl up` unit of edgekms-node instead,
# with the per-service units masked and the firewall opened for its port.
EDGEKMS_ROLE ??= ""
ROOTFS_POSTPROCESS_COMMAND += "edgekms_role;"

edgekms_lock_root[doc] = "Locks the root account: no password, no console login"
edgekms_lock_root() {
    # Nobody logs in: the first-boot ceremony (edgekms-provision) owns the serial console
    # until the board is provisioned, and everything after goes through the broker.
    sed -i -e 's,^root:[^:]*:,root:*:,' ${IMAGE_ROOTFS}${sysconfdir}/shadow
    if [ -f ${IMAGE_ROOTFS}${sysconfdir}/securetty ]; then
        : > ${IMAGE_ROOTFS}${sysconfdir}/securetty
    fi
}

edgekms_role[doc] = "Enables the unit of EDGEKMS_ROLE and masks the per-service units"
edgekms_role() {
    case "${EDGEKMS_ROLE}" in
        "") return 0 ;;
        node) port=6222 ;;
        fleet-hub) port=7422 ;;
        fleet-device) port="" ;;
        *) bbfatal "EDGEKMS_ROLE='${EDGEKMS_ROLE}': want node, fleet-hub, fleet-device or empty" ;;
    esac
    # Masked, not disabled: the image's preset pass enables what presets say, and a
    # masked unit stays off whatever enables it; Conflicts= in the role's unit besides.
    for unit in edgekms-setup edgekms-nats edgekms-init edgekms-crypto-hsm0 \
                edgekms-crypto-tpm0 edgekms-ca edgekms-broker; do
        systemctl --root=${IMAGE_ROOTFS} mask $unit.service
    done
    systemctl --root=${IMAGE_ROOTFS} enable edgekms-${EDGEKMS_ROLE}.service
    # Cluster routes (node) or devices' leaf connections (hub) come in from the LAN.
    if [ -n "$port" ]; then
        sed -i -e "/tcp dport 8443 ct state new accept/a\\        tcp dport $port ct state new accept" \
            ${IMAGE_ROOTFS}${sysconfdir}/nftables/edgekms.nft
    fi
}

CVE_PRODUCT = "edgekms"
