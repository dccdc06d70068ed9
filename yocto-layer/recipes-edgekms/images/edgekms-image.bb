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
                 edgekms-provision \
                 edgekms-setup \
                 opensc \
                 optee-client \
                 tpm2-tools \
                 tpm2-tss \
                 ${CORE_IMAGE_EXTRA_INSTALL}"

ROOTFS_POSTPROCESS_COMMAND += "edgekms_lock_root;"

edgekms_lock_root[doc] = "Locks the root account: no password, no console login"
edgekms_lock_root() {
    # Nobody logs in: the first-boot ceremony (edgekms-provision) owns the serial console
    # until the board is provisioned, and everything after goes through the broker.
    sed -i -e 's,^root:[^:]*:,root:*:,' ${IMAGE_ROOTFS}${sysconfdir}/shadow
    if [ -f ${IMAGE_ROOTFS}${sysconfdir}/securetty ]; then
        : > ${IMAGE_ROOTFS}${sysconfdir}/securetty
    fi
}

CVE_PRODUCT = "edgekms"
