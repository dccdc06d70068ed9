SUMMARY = "Standard protobuf reflection service for gRPC servers"
DESCRIPTION = "grpcio-reflection lets gRPC clients (grpcurl, kmsctl) discover the \
               services and messages that the EdgeKMS broker exposes. Its version \
               matches python3-grpcio from meta-python."
HOMEPAGE = "https://grpc.io/"
BUGTRACKER = "https://github.com/grpc/grpc/issues"
SECTION = "devel/python"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=731e401b36f8077ae0c134b59be5c906"

SRC_URI[sha256sum] = "2dd44806d68d0006636529bda573012b19a42281478c2d051cdaaebb91e2516c"

inherit pypi setuptools3

RDEPENDS:${PN} += "python3-grpcio \
                   python3-protobuf"

BBCLASSEXTEND = "native nativesdk"

CVE_PRODUCT = "grpc:grpc"
