"""An independent SPIFFE client (py-spiffe, PyPI `spiffe`) against our agent: the wire
compatibility check. Its own process, since py-spiffe's generated workload_pb2 and ours
declare the same proto symbols and cannot share one descriptor pool."""

from __future__ import annotations

import json
import sys

from spiffe import WorkloadApiClient


def main() -> int:
    socket_path, audience = sys.argv[1:]
    with WorkloadApiClient(socket_path=f"unix://{socket_path}") as client:
        svid = client.fetch_x509_svid()
        context = client.fetch_x509_context()
        bundles = client.fetch_x509_bundles()
        jwt = client.fetch_jwt_svid(audience={audience})
        validated = client.validate_jwt_svid(jwt.token, audience)
        jwt_bundles = client.fetch_jwt_bundles()
    print(
        json.dumps(
            {
                "spiffe_id": str(svid.spiffe_id),
                "leaf_serial": f"{svid.leaf.serial_number:X}",
                "chain": len(svid.cert_chain),
                "context_svids": [str(s.spiffe_id) for s in context.x509_svids],
                "x509_bundle_domains": sorted(str(b.trust_domain) for b in bundles.bundles),
                "jwt_spiffe_id": str(jwt.spiffe_id),
                "jwt_audience": sorted(jwt.audience),
                "validated": str(validated.spiffe_id),
                "jwt_bundle_for_own_domain": jwt_bundles.get_bundle_for_trust_domain(
                    svid.spiffe_id.trust_domain
                )
                is not None,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
