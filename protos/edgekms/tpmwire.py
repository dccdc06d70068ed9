"""Reading TPM 2.0 wire structures (big-endian integers, TPM2B sized buffers).

Two verifiers parse what a TPM signed: kmsctl's `key attest` check (mgmt/attestation.py)
and the broker's attested enrollment and unlock (edgekms/tpmcred.py). They share this
cursor; each names the typed error a short or over-long structure becomes, since they
answer it differently (a failed precondition of the evidence, an invalid request).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from edgekms.errors import KMSError


class TpmReader:
    """A cursor over TPM big-endian wire data that fails with `error(message)`, never
    IndexError. `max_len`: a structure longer than that is refused before it is read."""

    def __init__(
        self,
        data: bytes,
        what: str,
        error: Callable[[str], KMSError],
        max_len: int | None = None,
    ) -> None:
        if max_len is not None and len(data) > max_len:
            raise error(f"{what} is longer than {max_len} bytes")
        self.data = data
        self.pos = 0
        self.what = what
        self.error = error

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise self.error(f"{self.what} is truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return int(self.take(1)[0])

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def tpm2b(self) -> bytes:
        return self.take(self.u16())

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self.error(f"{self.what} has {len(self.data) - self.pos} trailing bytes")
