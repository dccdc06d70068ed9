SUMMARY = "EdgeKMS image for STM32MP15 boards"
DESCRIPTION = "A hardened, read-only image running the EdgeKMS services with \
               keys in OP-TEE's PKCS#11 TA and an SPI TPM 2.0: no root login, \
               no debug tools, a firewall open only on the broker's port."
HOMEPAGE = "https://github.com/edgekms/edgekms"
BUGTRACKER = "https://github.com/edgekms/edgekms/issues"
SECTION = "images"
LICENSE = "MIT"

inherit core-image

IMAGE_FEATURES += "read-only-rootfs"
IMAGE_FEATURES:remove = "debug-tweaks tools-debug tools-profile dbg-pkgs dev-pkgs"
IMAGE_LINGUAS = ""

IMAGE_INSTALL += "edgekms \
                  edgekms-broker \
                  edgekms-ca \
                  edgekms-crypto-hsm \
                  edgekms-crypto-tpm \
                  edgekms-firewall \
                  edgekms-init \
                  edgekms-nats \
                  edgekms-setup \
                  opensc \
                  optee-client \
                  packagegroup-core-boot \
                  tpm2-tools \
                  tpm2-tss"

# systemd-tmpfiles creates the state directories on the writable /var/lib.
ROOTFS_POSTPROCESS_COMMAND += "edgekms_lock_root;"

edgekms_lock_root[doc] = "Locks the root account: no password, no console login"
edgekms_lock_root() {
    # No password for root and no way to log in as root on a console or over ssh.
    sed -i -e 's,^root:[^:]*:,root:*:,' ${IMAGE_ROOTFS}${sysconfdir}/shadow
    if [ -f ${IMAGE_ROOTFS}${sysconfdir}/securetty ]; then
        : > ${IMAGE_ROOTFS}${sysconfdir}/securetty
    fi
}

COMPATIBLE_MACHINE = "stm32mp15-disco|stm32mp1common"

CVE_PRODUCT = "edgekms"
