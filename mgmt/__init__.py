"""EdgeKMS management: `kmsctl` (the administrators' CLI), the Python client for gRPC
users, and the mini-CA. Talks to the system through the broker (and, during the
bootstrap ceremony only, directly to NATS)."""
