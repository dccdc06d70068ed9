"""EdgeKMS wire contract: generated protobuf code (edgekms.v1) and the few hand-written
helpers that every service shares about it: typed errors, algorithm rules, NATS subjects.

Nothing here talks to a token; services import it, never each other. The gRPC client
(edgekms.client, edgekms.clientconfig) lives here too, so that `protos/` alone builds the
slim `edgekms-client` distribution (protos/pyproject.toml) for callers who need none of
the server's dependencies.
"""
