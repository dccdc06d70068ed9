SUMMARY = "Python bindings for the TPM2 software stack (ESAPI, FAPI, marshalling, TCTIs)"
DESCRIPTION = "tpm2-pytss, the Python bindings the EdgeKMS tpm0 crypto service uses to \
               reach the TPM 2.0 through tpm2-tss. meta-tpm carries 2.1.0, which does \
               not import with the python3-cryptography 42 of scarthgap (tpm2-pytss \
               issue 561, fixed in 2.2.0); this layer's priority makes 2.2.1 win."
HOMEPAGE = "https://github.com/tpm2-software/tpm2-pytss"
BUGTRACKER = "https://github.com/tpm2-software/tpm2-pytss/issues"
SECTION = "devel/python"
LICENSE = "BSD-2-Clause"
LIC_FILES_CHKSUM = "file://LICENSE;md5=500b2e742befc3da00684d8a1d5fd9da"

SRC_URI[sha256sum] = "b8f15473422f377f59c7217dcd1479165cce62dfa33934ec976a278baf2e9efe"

PYPI_PACKAGE = "tpm2-pytss"

# setup.py preprocesses tpm2-tss's headers (pycparser) and finds them with pkg-config;
# the cffi extension links against libtss2.
DEPENDS = "python3-asn1crypto-native \
           python3-cffi-native \
           python3-cryptography-native \
           python3-pkgconfig-native \
           python3-pycparser-native \
           python3-setuptools-scm-native \
           tpm2-tss"

inherit pkgconfig pypi python_setuptools_build_meta

RDEPENDS:${PN} += "libtss2 \
                   python3-asn1crypto \
                   python3-cffi \
                   python3-cryptography \
                   python3-packaging \
                   python3-pyyaml"

CVE_PRODUCT = "tpm2-software:tpm2-pytss"
