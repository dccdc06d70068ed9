SUMMARY = "EdgeKMS data partition placeholder for ST's flash layout"
DESCRIPTION = "An empty ext4 partition image (PARTLABEL edgekmsfs) that ST's flash \
               layout writes next to the root file system. edgekms-provision turns it \
               into a LUKS2 volume sealed to the TPM on the first boot; it never \
               carries data from the build."
HOMEPAGE = "https://github.com/edgekms/edgekms"
BUGTRACKER = "https://github.com/edgekms/edgekms/issues"
SECTION = "images"
LICENSE = "MIT"

# ST's partition-image recipe: core-image with an empty package list, sized and
# labelled from PARTITIONS_IMAGES[edgekmsfs] (conf/distro/edgekms-os.conf).
inherit core-image
# From meta-st-stm32mp, present whenever this dynamic layer is parsed.
# nooelint: oelint.file.requirenotfound
require recipes-st/images/st-image-partitions.inc

# nooelint: oelint.vars.mispell
IMAGE_ROOTFS_MAXSIZE = ""
PACKAGE_INSTALL = ""

CVE_PRODUCT = "edgekms"
