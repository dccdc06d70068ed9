"""EdgeKMS broker: the single gRPC ingress (mTLS, authz, audit, routing over NATS)."""
