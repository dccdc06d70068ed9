"""The SPIFFE Workload API agent of a device (`kmsctl spiffe agent`, docs/spiffe.md).

Its own process beside `kmsctl agent`: that one keeps files fresh on a schedule, this
one answers local programs on a socket, all day, and must stay small and always up.
"""
