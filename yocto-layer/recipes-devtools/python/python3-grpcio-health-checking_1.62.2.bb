SUMMARY = "Standard health checking service for gRPC servers"
DESCRIPTION = "grpcio-health-checking implements grpc.health.v1, which the EdgeKMS \
               broker answers for systemd and container health checks. Its version \
               matches python3-grpcio from meta-python."
HOMEPAGE = "https://grpc.io/"
BUGTRACKER = "https://github.com/grpc/grpc/issues"
SECTION = "devel/python"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=731e401b36f8077ae0c134b59be5c906"

SRC_URI[sha256sum] = "a44d1ea1e1510b5c62265dada04d86621bb1491d75de987713c9c0ea005c10a8"

inherit pypi setuptools3

RDEPENDS:${PN} += "python3-grpcio \
                   python3-protobuf"

BBCLASSEXTEND = "native nativesdk"

CVE_PRODUCT = "grpc:grpc"
