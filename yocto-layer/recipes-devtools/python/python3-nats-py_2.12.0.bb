SUMMARY = "Asyncio client for the NATS messaging system"
DESCRIPTION = "nats-py, the Python client for NATS with JetStream, key-value \
               stores and the micro services framework (nats.micro) that the \
               EdgeKMS services use for discovery, stats and health."
HOMEPAGE = "https://github.com/nats-io/nats.py"
BUGTRACKER = "https://github.com/nats-io/nats.py/issues"
SECTION = "devel/python"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=86d3f3a95c324c9479bd8986968f4327"

# 2.12.0 is the newest release whose pyproject.toml the setuptools of scarthgap
# (69.1) can read: 2.13 switched to a PEP 639 licence string, 2.15 to uv_build.
SRC_URI[sha256sum] = "2981ca4b63b8266c855573fa7871b1be741f1889fd429ee657e5ffc0971a38a1"

inherit pypi python_setuptools_build_meta

PYPI_PACKAGE = "nats_py"
UPSTREAM_CHECK_PYPI_PACKAGE = "nats-py"

RDEPENDS:${PN} += "python3-asyncio \
                   python3-json \
                   python3-netclient"

BBCLASSEXTEND = "native nativesdk"

CVE_PRODUCT = "nats-io:nats.py"
