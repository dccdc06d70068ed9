"""The gRPC client, now `edgekms.client` (shipped alone as the `edgekms-client`
distribution, protos/pyproject.toml); this name stays so that `from mgmt.client import
KMSClient` in existing scripts goes on working."""

from edgekms.client import *  # noqa: F403
