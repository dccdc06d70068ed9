# Only for the EdgeKMS distribution: the kernel fragment and the SPI TPM's device-tree node.
FILESEXTRAPATHS:prepend:edgekms-os := "${THISDIR}/${PN}:"

SRC_URI:append:edgekms-os = " \
    file://edgekms.config;subdir=fragments/edgekms \
    file://stm32mp15xx-dkx-edgekms-tpm.dtsi \
"

# linux-stm32mp merges KERNEL_CONFIG_FRAGMENTS in its do_configure; ours goes last.
# nooelint: oelint.vars.mispell.unknown
KERNEL_CONFIG_FRAGMENTS:append:edgekms-os = " ${WORKDIR}/fragments/edgekms/edgekms.config"

# The DK boards have no TPM node: include ours at the end of the DK1/DK2 common dtsi
# (no context-sensitive patch against ST's tree), once.
do_configure:prepend:edgekms-os() {
    dkx=$(find ${S}/arch/arm/boot/dts -name stm32mp15xx-dkx.dtsi | head -n 1)
    [ -n "$dkx" ] || bbfatal "stm32mp15xx-dkx.dtsi not found in the kernel tree"
    install -m 0644 ${WORKDIR}/stm32mp15xx-dkx-edgekms-tpm.dtsi $(dirname $dkx)/
    grep -q 'stm32mp15xx-dkx-edgekms-tpm.dtsi' $dkx || \
        printf '\n#include "stm32mp15xx-dkx-edgekms-tpm.dtsi"\n' >> $dkx
}
