"""EdgeKMS wire contract: generated protobuf code (edgekms.v1) and the few hand-written
helpers that every service shares about it: typed errors, algorithm rules, NATS subjects.

Nothing here talks to a network or a token; services import it, never each other.
"""
