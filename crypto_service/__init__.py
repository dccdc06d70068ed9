"""EdgeKMS crypto service: one NATS (nats.micro) service per token, answering key
operations on kms.crypto.<provider>.<Operation> for the keys that token holds."""
