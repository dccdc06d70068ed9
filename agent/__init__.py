"""The device-side agent (`kmsctl agent`): keeps a device's certificates, keys and CRL
files fresh, unattended.

It is a client of the KMS like any other (a client config and certificate), run as its
own process so the long-running loop carries neither the CLI nor any service's code.
One module per concern, so the later jobs of the device side (the unlock client, SPIFFE
workload identities) can join as further item kinds without touching the loop:

    config.py    the TOML file: what to keep, where, with which modes and reload command
    schedule.py  when each item is due: renewal point, CRL refresh, backoff with jitter
    files.py     atomic writes with mode and owner, the files as they are now
    reload.py    the reload command after a change (argv, no shell, no secrets)
    certs.py     certificates and keys: issue when missing, renew when due
    crl.py       CRL files (OpenVPN's crl-verify): fetched, checked, replaced in time
    state.py     the state file: each item's next due time and last result
    runner.py    the loop: passes, signals (SIGTERM stops, SIGHUP reloads the config)
"""
