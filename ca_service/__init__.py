"""The mini-CA: profiles, request checks, certificate/CRL/OCSP builders (pure, any signer),
its JetStream KV store, and the NATS + HTTP service that runs it (`kmsctl ca serve`)."""
