"""EdgeKMS benchmarks (`make bench`, `python -m bench`): raw provider rates, end-to-end
signing over gRPC, certificate issuance against cfssl, memory and start-up time.

Nothing here runs in `make test`; tests/bench checks only the pure helpers in bench.stats.
"""
