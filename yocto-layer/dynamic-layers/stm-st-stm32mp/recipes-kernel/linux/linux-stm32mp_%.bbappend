# Only for the EdgeKMS distribution: the kernel fragment of the image.
FILESEXTRAPATHS:prepend:edgekms-os := "${THISDIR}/${PN}:"

SRC_URI:append:edgekms-os = " file://edgekms.config;subdir=fragments/edgekms"

# linux-stm32mp merges KERNEL_CONFIG_FRAGMENTS in its do_configure; ours goes last.
# nooelint: oelint.vars.mispell.unknown
KERNEL_CONFIG_FRAGMENTS:append:edgekms-os = " ${WORKDIR}/fragments/edgekms/edgekms.config"
