"""The client config file, now `edgekms.clientconfig` (part of the slim client
distribution); this name stays for existing imports."""

from edgekms.clientconfig import *  # noqa: F403
